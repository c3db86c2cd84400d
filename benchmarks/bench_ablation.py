"""Ablation on POWER (issue 5): what each LFM ingredient buys, one change at a time from the default.

The default is ``configs/power_cpu.yaml``, the CPU-scaled authors' POWER setting (3 OU blocks,
h = 0.15, 0.195, 0.2535, and the free block; an MLP 128x3 per block; rk4 x6 per block for the
pushforward). Each variant changes one ingredient: the number of OU blocks, their step sizes, the
free block (without it the chain ends where the OU process has got to, the theory's setting), the
warm start, the interpolant and the law of the training time. Every variant trains with
``localfm.fit`` for the same wall-clock budget (pushforward included; the config's step counts are
lifted so that the budget, shared equally among the blocks, decides) on the same training subset
and seed, then its test NLL is taken with dopri5 (rtol = atol = 1e-5) on the same test points, so
``delta`` (variant minus default, point by point) has a paired standard error. One training seed:
the paired error covers the test points, not the training noise. Variants with another number of
blocks get the block width that keeps the total parameter count of the default (equal model size).

Variants run ``--workers`` at a time, one thread each, so that every variant has a core to itself.

    python benchmarks/bench_ablation.py                 # 300 s per variant, ~30 minutes on 2 cores
    python benchmarks/bench_ablation.py --budget 120    # shorter
    python benchmarks/bench_ablation.py --tiny --out DIR   # CI smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402, I001  (first: it sets the OpenMP wait policy before torch loads)
from _common import ROOT, metadata, write_results  # noqa: E402

import numpy as np  # noqa: E402
import yaml  # noqa: E402

import contenders as C  # noqa: E402

BASE = ROOT / "configs" / "power_cpu.yaml"
DIM = 6  # POWER's dimension
TEST_SOLVER = {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5}

#: (name, what changes, changes to the default config as nested dict updates)
VARIANTS = (
    ("default", "configs/power_cpu.yaml", {}),
    ("1 OU block", "blocks.h = [0.15] (+ free block)", {"blocks": {"h": [0.15]}}),
    (
        "6 OU blocks",
        "blocks.h = 0.15 x 1.3^k, k < 6 (+ free block)",
        {"blocks": {"h": [0.15 * 1.3**k for k in range(6)]}},
    ),
    ("equal h", "blocks.h = [0.2, 0.2, 0.2]", {"blocks": {"h": [0.2, 0.2, 0.2]}}),
    ("h x 2", "blocks.h = [0.3, 0.39, 0.507]", {"blocks": {"h": [0.3, 0.39, 0.507]}}),
    (
        "no free block",
        "blocks.h = [0.15, 0.3, 0.6, 1.2], free_block: false (OU time 2.25, ends at N(0, I) only approximately)",
        {"blocks": {"h": [0.15, 0.3, 0.6, 1.2], "free_block": False}},
    ),
    ("no warm start", "train.warm_start: false (each block from a fresh network)", {"train": {"warm_start": False}}),
    ("trig interpolant", "train.interpolant: trig (the authors'; default linear)", {"train": {"interpolant": "trig"}}),
    (
        "beta(0.5, 0.5) time",
        "train.time_dist: beta, a = b = 0.5 (more weight at both ends)",
        {"train": {"time_dist": "beta", "time_a": 0.5, "time_b": 0.5}},
    ),
)


def variant_config(changes: dict, width: int | None = None) -> dict:
    """The default config (its blocks ``width`` wide if given) with ``changes``; another number of
    blocks keeps the total parameters."""
    base = yaml.safe_load(BASE.read_text())
    base.pop("data", None)
    base["net"]["width"] = width or base["net"]["width"]
    cfg = {group: {**base.get(group, {}), **changes.get(group, {})} for group in base}
    cfg["train"]["steps"] = 10**8  # the wall-clock budget decides, shared equally among the blocks
    if (n := C.n_blocks(cfg)) != C.n_blocks(base):  # the width whose n blocks come closest to the default's count
        cfg["net"]["width"] = C.blocks_width(DIM, base, n)
    return cfg


def child(spec: dict) -> None:
    """One variant: fit for the budget, then per-point test log-likelihoods; writes spec['out']."""
    import torch

    import localfm
    from localfm.datasets import load
    from localfm.ode import SolverConfig

    torch.set_num_threads(1)
    ds = load("power")
    rng = np.random.default_rng(spec["seed"])
    train = torch.from_numpy(np.ascontiguousarray(ds.train[rng.permutation(len(ds.train))[: spec["n_train"]]]))
    test = torch.from_numpy(ds.test[: spec["n_test"]])
    cpu0, t0 = time.process_time(), time.perf_counter()
    flow = localfm.fit(train, spec["config"], time_budget=spec["budget"], seed=spec["seed"])
    fit_s, fit_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    t0 = time.perf_counter()
    lp = flow.log_prob(test, solver=SolverConfig(**spec["test_solver"]), batch_size=8192).double().numpy()
    np.save(spec["out"], lp)
    log = flow.training_log
    print(
        json.dumps(
            {
                "fit_s": fit_s,
                "fit_cpu_s": fit_cpu,
                "push_s": sum(b["push_seconds"] for b in log),
                "steps": [b["steps"] for b in log],
                "blocks": len(flow),
                "parameters": sum(p.numel() for p in flow.parameters()),
                "nll_eval_s": time.perf_counter() - t0,
            }
        )
    )


def run_variant(i: int, name: str, changes: dict, a, folder: Path) -> dict:
    cfg = variant_config(changes, 32 if a.tiny else None)
    spec = {
        "config": cfg,
        "budget": a.budget,
        "seed": a.seed,
        "n_train": a.n_train,
        "n_test": a.n_test,
        "test_solver": {"method": "rk4", "steps": 2} if a.tiny else TEST_SOLVER,
        "out": str(folder / f"variant{i}.npy"),
    }
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"variant {name!r} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{name:22s} fit {row['fit_s']:6.1f} s (push {row['push_s']:5.1f} s), steps {row['steps']}", flush=True)
    return {"variant": name, **row, "lp": np.load(spec["out"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=300.0, help="wall-clock seconds of fit per variant (default 300)")
    p.add_argument("--n-train", type=int, default=150_000, help="training points (a fixed random subset)")
    p.add_argument("--n-test", type=int, default=20_000, help="test points of the NLL (the first ones)")
    p.add_argument("--workers", type=int, default=2, help="variants trained at once, one thread each")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    _common.add_suite_options(p, "CI smoke run, seconds")
    a = p.parse_args()
    if a.child:
        return child(json.loads(a.child))
    if a.tiny:
        a.budget, a.n_train, a.n_test = 2.0, 5_000, 500
    _common.start(a.out, 1)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-ablation-") as tmp, ThreadPoolExecutor(a.workers) as pool:
        futures = [
            pool.submit(run_variant, i, name, changes, a, Path(tmp)) for i, (name, _, changes) in enumerate(VARIANTS)
        ]
        runs = [f.result() for f in futures]
    base = runs[0]["lp"]
    rows = []
    for (_, change, _), r in zip(VARIANTS, runs, strict=True):
        lp = r.pop("lp")
        d = base - lp  # variant NLL minus default NLL, point by point
        rows.append(
            {
                **r,
                "change": change,
                "nll": float(-lp.mean()),
                "nll_se": float(lp.std(ddof=1) / math.sqrt(len(lp))),
                "delta": float(d.mean()),
                "delta_se": float(d.std(ddof=1) / math.sqrt(len(d))),
            }
        )
    plot(rows, a)
    name = "ablation_power_tiny" if a.tiny else "ablation_power"
    cols = [
        "variant",
        "change",
        "nll",
        "nll_se",
        "delta",
        "delta_se",
        "blocks",
        "parameters",
        "steps",
        "push_s",
        "fit_s",
        "fit_cpu_s",
    ]
    write_results(
        name,
        "Ablation on POWER: what each LFM ingredient buys (one change at a time, equal wall-clock)",
        metadata(
            [a.seed],
            budget_s=a.budget,
            n_train=a.n_train,
            n_test=a.n_test,
            workers=a.workers,
            base=str(BASE.relative_to(ROOT)),
        ),
        {"Variants": [{k: r[k] for k in cols} for r in rows]},
        notes=(
            f"{__doc__.split(chr(10) + chr(10))[1]}\n\n`nll` ± `nll_se`: test NLL (nats) on the first "
            f"{a.n_test:,} test points with {'rk4 x2 (tiny run)' if a.tiny else 'dopri5 (1e-5)'}; "
            "`delta` ± `delta_se`: the variant's NLL minus the default's on the same points "
            "(positive: what the variant removes or changes helps). "
            f"`steps`: optimiser steps per block in the {a.budget:g} s; `push_s`: seconds of pushforward inside it. "
            f"Total run time {time.perf_counter() - t_start:.0f} s."
        ),
    )


def plot(rows: list[dict], a) -> None:
    plt = _common.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1))
    names = [r["variant"] for r in rows][::-1]
    ax.errorbar(
        [r["delta"] for r in rows][::-1], range(len(rows)), xerr=[2 * r["delta_se"] for r in rows][::-1], fmt="o"
    )
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(rows)), names)
    ax.set_xlabel("test NLL minus the default's (nats; ± 2 paired SE)")
    ax.set_title(f"POWER, {a.budget:g} s of fit per variant")
    _common.save_figure(fig, "ablation_power_tiny" if a.tiny else "ablation_power")


if __name__ == "__main__":
    main()
