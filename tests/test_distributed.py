"""Training under torchrun: real processes (gloo on CPU), compared with training in one process.

``torchrun --standalone --nproc-per-node 2 -m localfm.cli train`` runs the block-by-block method
and ``train.parallel_blocks``, and ``... -m localfm.cli eval`` evaluates a run trained in this
process; the launches overlap (most of a launch is starting Python and importing torch). The tests
read the run folders and compare them with the same configs trained in this process.

Why a 2-process run is not bit-identical to a 1-process run with the same global batch: rank 1
draws its half of every batch from its own random stream (the single process draws the whole batch
from one stream), and DDP's all-reduce adds the two half-batch gradients in another order than the
mean over one batch. The runs are two draws of the same training procedure, so their NLLs differ by
training noise: on this config, 1-process runs with six seeds gave test NLLs of 3.40..3.46 nats
(sd 0.02), hence the tolerance of 0.1 nats on the difference. What is exact, and tested here: the
ranks' parameters (DDP), the blocks of ``parallel_blocks`` (each seeded on its own), and the sharded
evaluation of a given model (up to float32 rounding). A resume with the same number of ranks is
bit-identical too; that needs two more launches, so it is checked by hand (README).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import localfm
from localfm import datasets, distributed
from localfm.config import load_config
from localfm.parallel import marginal_pairs
from localfm.runs import load_run_data, train_run

CONFIG = {
    "seed": 0,
    "net": {"width": 32, "depth": 2, "activation": "silu"},
    "blocks": {"schedule": "constant", "c": 0.3, "L": 2, "free_block": True},
    "train": {
        "steps": 100,
        "batch_size": 1024,
        "lr": 1.0e-2,
        "lr_schedule": "cosine",
        "log_every": 25,
        "checkpoint_every": 50,
        "push_batch_size": 4096,
    },
    "solver": {"method": "rk4", "steps": 4},
}
PARALLEL = ("train.parallel_blocks=true",)
NLL_TOLERANCE = 0.1  # nats; see the module docstring


def _torchrun(cwd: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "localfm.cli"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out = subprocess.PIPE
    return subprocess.Popen([*cmd, *args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, name: str) -> str:
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, f"torchrun {name} failed ({proc.returncode}):\n{output[-4000:]}"
    return output


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Run folders of ``localfm train`` under torchrun (``seq``: block by block, ``par``: parallel OU
    blocks) and the same configs trained here (``one`` and its flow ``one_flow``, ``par_one``); ``one``
    is evaluated by ``localfm eval`` under torchrun. The launches overlap with the work done here."""
    work = tmp_path_factory.mktemp("dist")
    np.save(work / "8gaussians.npy", datasets.load("8gaussians").train[:12_500])  # 10,000 train, 1,250 test
    settings = {"data": str(work / "8gaussians.npy"), **CONFIG}
    config = work / "tiny.yaml"
    config.write_text(yaml.safe_dump(settings))
    par_args = [a for s in PARALLEL for a in ("--set", s)]
    procs = {
        "seq": _torchrun(work, "train", str(config), "--out", str(work / "seq"), "--no-eval"),
        "par": _torchrun(work, "train", str(config), "--out", str(work / "par"), "--no-eval", *par_args),
    }
    one, _ = train_run(settings, work / "one")
    procs["eval"] = _torchrun(work, "eval", str(work / "one"), "--n-samples", "1000")
    cfg = load_config(settings, PARALLEL)
    par_one = localfm.fit(torch.from_numpy(load_run_data(cfg).train), cfg)
    for name, proc in procs.items():
        output = _finish(proc, name)
        assert name == "eval" or "trained 3 blocks on 2 processes" in output
    ds = load_run_data(load_config(settings))
    return {
        "settings": settings,
        "train": torch.from_numpy(ds.train),
        "test": torch.from_numpy(ds.test),
        "one_flow": one,
        "par_one": par_one,
        **{k: work / k for k in ("seq", "par", "one")},
    }


def _nll(flow: localfm.LocalFlow, x: torch.Tensor) -> float:
    return float(-flow.log_prob(x).mean())


def test_every_rank_ends_with_the_saved_parameters(runs) -> None:
    for name in ("seq", "par"):
        info = json.loads((runs[name] / "run.json").read_text())
        assert info["world_size"] == 2 and info["replicas_identical"]
        # Each rank hashed its own parameters after training; rank 0 saved the model.
        saved = distributed.digest(localfm.load(runs[name] / "model"))
        assert info["rank_digests"] == [saved, saved]


def test_sharded_evaluation_matches_one_process(runs) -> None:
    """``localfm eval`` on 2 processes gives the NLL one process computes for the same model."""
    metrics = json.loads((runs["one"] / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["n"] == len(runs["test"])
    # Fixed-step solver, exact divergence: each point's log-density does not depend on who computes it.
    assert metrics["nll"] == pytest.approx(_nll(localfm.load(runs["one"] / "model"), runs["test"]), abs=1e-5)
    assert math.isfinite(metrics["energy_distance"])


def test_nll_matches_one_process_with_the_same_global_batch(runs) -> None:
    two = localfm.load(runs["seq"] / "model")
    assert abs(_nll(two, runs["test"]) - _nll(runs["one_flow"], runs["test"])) < NLL_TOLERANCE


def test_resume_with_another_number_of_processes(runs, tmp_path) -> None:
    """A 2-process run, cut inside the free block, finishes in 1 process from rank 0's checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(runs["seq"], run)
    shutil.rmtree(run / "model")
    shutil.rmtree(run / "checkpoints" / "b03-s0000000")  # the newest left is b02-s0000050
    flow = localfm.fit(runs["train"], load_config(runs["settings"]), run_dir=run, resume=True)
    two = localfm.load(runs["seq"] / "model")
    for n in (0, 1):  # the finished blocks come from the checkpoint unchanged
        assert distributed.digest(flow.blocks[n]) == distributed.digest(two.blocks[n])
    assert flow.training_log[2]["steps"] == 100
    assert abs(_nll(flow, runs["test"]) - _nll(two, runs["test"])) < NLL_TOLERANCE


def test_parallel_blocks_are_the_same_for_any_number_of_processes(runs) -> None:
    one, two = runs["par_one"], localfm.load(runs["par"] / "model")
    assert [r.get("parallel_rank") for r in two.training_log] == [0, 1, None]  # one OU block per rank
    for n in (0, 1):  # trained on different ranks, from per-block streams: bit-identical
        assert distributed.digest(one.blocks[n]) == distributed.digest(two.blocks[n])
    assert abs(_nll(two, runs["test"]) - _nll(one, runs["test"])) < NLL_TOLERANCE


# --- the helpers in one process, and the checks at the boundary --------------------------------


def test_global_batch_must_split_evenly() -> None:
    assert distributed.local_batch_size(256, distributed.World(1, 4, 1)) == 64
    with pytest.raises(ValueError, match=r"train.batch_size \(255\) must be divisible by the number of processes"):
        distributed.local_batch_size(255, distributed.World(0, 2, 0))


def test_world_from_torchrun_environment(monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.from_env() == distributed.World(0, 1, 0)
    monkeypatch.setenv("RANK", "3")  # RANK alone, as some schedulers set it: no torchrun world
    assert distributed.from_env() == distributed.World(0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.from_env() == distributed.World(3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK=4 and WORLD_SIZE=4"):
        distributed.from_env()


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_shards_cover_the_points_in_order(size: int) -> None:
    for n in range(0, 40):
        bounds = [distributed.shard_bounds(n, r, size) for r in range(size)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        sizes = [b - a for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1


def test_one_process_helpers_are_the_identity() -> None:
    x = torch.randn(7, 3)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    assert distributed.world() == distributed.World(0, 1, 0)
    assert torch.equal(distributed.map_sharded(lambda s: s * 2, x), x * 2)
    assert distributed.rank_generator(g) is g
    distributed.resync(g)
    assert torch.equal(g.get_state(), state)
    assert distributed.derive_seed(state, 1) != distributed.derive_seed(state, 2)


def test_marginal_pairs_follow_the_ou_marginals() -> None:
    """x_l ~ OU marginal at t_{n-1} of the data, x_r one OU step h further: means and variances."""
    data = torch.randn(4000, 2, dtype=torch.float64) * torch.tensor([0.5, 2.0]) + torch.tensor([3.0, -1.0])
    cfg = load_config({"train": {"batch_size": 8}})
    t, h = 0.6, 0.3
    x_l, x_r = marginal_pairs(data, t, h, cfg.train, torch.Generator().manual_seed(0), 400_000)
    m, v = data.mean(0), data.var(0)
    for x, s in ((x_l, t), (x_r, t + h)):
        assert torch.allclose(x.mean(0), math.exp(-s) * m, atol=0.02)
        assert torch.allclose(x.var(0), math.exp(-2 * s) * v + 1 - math.exp(-2 * s), rtol=0.02)
    # dependent pairs: Cov(x_l, x_r) = e^{-h} Var(x_l)
    cov = ((x_l - x_l.mean(0)) * (x_r - x_r.mean(0))).mean(0)
    assert torch.allclose(cov, math.exp(-h) * x_l.var(0), rtol=0.02)


def test_parallel_block_options_are_checked() -> None:
    with pytest.raises(ValueError, match="finetune_steps"):
        load_config(CONFIG, ("train.finetune_steps=10",))
    cfg = load_config(CONFIG, PARALLEL)
    with pytest.raises(ValueError, match="parallel_blocks"):
        localfm.fit(torch.randn(100, 2), cfg, time_budget=10.0)
