"""Conditional LFM (context, classifier-free guidance, distillation) and the Meta-World policies."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import localfm
from localfm.distill import DistillConfig, distill, load_distilled
from localfm.policy import Demonstrations, Normalizer, PolicyConfig, load_policy, make_windows, train_policy

ROOT = Path(__file__).resolve().parents[1]
HAS_METAWORLD = importlib.util.find_spec("metaworld") is not None
needs_metaworld = pytest.mark.skipif(not HAS_METAWORLD, reason="metaworld is not installed (the robot extra)")

COND = {
    "net": {"width": 48, "depth": 2, "context_dim": 1, "activation": "silu"},
    "blocks": {"schedule": "list", "h": [0.3]},
    "train": {"steps": 400, "batch_size": 256, "lr": 3e-3},
    "solver": {"method": "rk4", "steps": 6},
}


def two_means(n: int = 3000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x | c ~ N(4c - 2, 0.3^2) for c in {0, 1}: means -2 and +2."""
    g = torch.Generator().manual_seed(seed)
    c = (torch.rand(n, 1, generator=g) < 0.5).float()
    return (4 * c - 2) + 0.3 * torch.randn(n, 1, generator=g), c


@pytest.fixture(scope="module")
def cond_flow() -> localfm.LocalFlow:
    x, c = two_means()
    # 1,200 steps: at 400 the linear interpolant's model still leaked c = 0 samples towards +2
    # (mean -1.85, sd 0.82), trig's less (-1.92, 0.65); at 1,200 both are within 0.06 of the means.
    cfg = dict(COND, train=dict(COND["train"], context_dropout=0.2, steps=1200))
    return localfm.fit(x, cfg, context=c, seed=0)


def test_conditional_fit_learns_the_context_dependent_means(cond_flow) -> None:
    for value, mean in ((0.0, -2.0), (1.0, 2.0)):
        s = cond_flow.sample(2000, context=torch.full((2000, 1), value), generator=torch.Generator().manual_seed(1))
        assert abs(float(s.mean()) - mean) < 0.15, (value, float(s.mean()))
        assert 0.1 < float(s.std()) < 1.0  # the two modes are not mixed (their gap is 4)


def test_conditional_log_prob_prefers_the_right_context(cond_flow) -> None:
    x = torch.full((4, 1), 2.0)
    right = cond_flow.log_prob(x, context=torch.ones(4, 1))
    wrong = cond_flow.log_prob(x, context=torch.zeros(4, 1))
    assert bool((right > wrong + 3).all())


def test_guidance_zero_is_unguided_and_guidance_changes_samples(cond_flow) -> None:
    c = torch.ones(300, 1)
    plain = cond_flow.sample(300, context=c, generator=torch.Generator().manual_seed(2))
    zero = cond_flow.sample(300, context=c, generator=torch.Generator().manual_seed(2), guidance=0.0)
    strong = cond_flow.sample(300, context=c, generator=torch.Generator().manual_seed(2), guidance=2.0)
    assert torch.equal(plain, zero)
    assert not torch.allclose(plain, strong)
    # The guided field is (1 + w) v(x, c) - w v(x, null): check it on the network directly.
    block = cond_flow[0]
    x, t = torch.randn(5, 1), torch.full((5,), 0.3)
    w = 1.5
    expected = (1 + w) * block.net(x, t, c[:5]) - w * block.net(x, t, block.net.null_context.expand(5, 1))
    assert torch.allclose(block.velocity(c[:5], w)(x, t), expected, atol=1e-6)


def test_context_dropout_trains_the_null_context(cond_flow) -> None:
    assert float(cond_flow[0].net.null_context.detach().abs().sum()) > 0


def test_context_validation_errors(cond_flow) -> None:
    x, c = two_means(100)
    with pytest.raises(ValueError, match="conditional"):
        cond_flow.sample(10)
    with pytest.raises(ValueError, match="rows"):
        cond_flow.sample(10, context=torch.zeros(7, 1))
    with pytest.raises(ValueError, match=r"shape \(N, 1\)"):
        cond_flow.sample(10, context=torch.zeros(10, 2))
    with pytest.raises(ValueError, match="rows"):
        localfm.fit(x, COND, context=c[:-1])
    with pytest.raises(ValueError, match="conditional"):
        localfm.fit(x, COND)
    with pytest.raises(ValueError, match="unconditional"):
        localfm.fit(x, dict(COND, net={"width": 8, "depth": 1}), context=c)
    with pytest.raises(ValueError, match="non-finite"):
        localfm.fit(x, COND, context=torch.full_like(c, float("nan")))
    uncond = localfm.fit(x, {"net": {"width": 8, "depth": 1}, "blocks": {"L": 0}, "train": {"steps": 2}})
    with pytest.raises(ValueError, match="unconditional"):
        uncond.sample(3, context=torch.zeros(3, 1))
    with pytest.raises(ValueError, match="context_dropout"):
        localfm.FlowConfig(train=localfm.TrainConfig(context_dropout=1.0))


def test_conditional_flow_save_load_round_trip(cond_flow, tmp_path) -> None:
    cond_flow.save(tmp_path / "m")
    back = localfm.load(tmp_path / "m")
    c = torch.ones(20, 1)
    a = cond_flow.sample(20, context=c, generator=torch.Generator().manual_seed(3), guidance=1.0)
    b = back.sample(20, context=c, generator=torch.Generator().manual_seed(3), guidance=1.0)
    assert torch.equal(a, b)


def test_resume_with_context_continues_exactly(tmp_path) -> None:
    """Checkpoints keep the pool; the caller passes the (unchanging) context again on resume."""
    x, c = two_means(600)
    cfg = dict(COND, train=dict(COND["train"], steps=60))
    full = localfm.fit(x, cfg, context=c, seed=0, run_dir=tmp_path / "a")
    part = tmp_path / "b" / "checkpoints"
    part.mkdir(parents=True)
    src = tmp_path / "a" / "checkpoints"
    shutil.copytree(src / "b01-s0000000", part / "b01-s0000000")
    for pool in src.glob("pool-b01-*"):
        shutil.copy(pool, part / pool.name)
    resumed = localfm.fit(x, cfg, context=c, seed=0, run_dir=tmp_path / "b", resume=True)
    ctx = torch.zeros(50, 1)
    g = torch.Generator
    assert torch.equal(
        full.sample(50, context=ctx, generator=g().manual_seed(0)),
        resumed.sample(50, context=ctx, generator=g().manual_seed(0)),
    )


def test_distilling_a_conditional_flow_keeps_the_context_dependence(cond_flow, tmp_path) -> None:
    x, c = two_means()
    cfg = DistillConfig(train_steps=300, batch_size=256, generation_pairs=2000, val_pairs=128)
    fast = distill(cond_flow, cfg, x_train=x, context=c)
    assert fast.nfe == len(cond_flow)
    for value, mean in ((0.0, -2.0), (1.0, 2.0)):
        s = fast.sample(2000, context=torch.full((2000, 1), value), generator=torch.Generator().manual_seed(1))
        assert abs(float(s.mean()) - mean) < 0.2
    with pytest.raises(ValueError, match="context"):
        distill(cond_flow, cfg, x_train=x)
    fast.save(tmp_path / "d")
    back = load_distilled(tmp_path / "d")
    ctx = torch.ones(8, 1)
    assert torch.equal(
        fast.sample(8, context=ctx, generator=torch.Generator().manual_seed(4)),
        back.sample(8, context=ctx, generator=torch.Generator().manual_seed(4)),
    )


# --- policy pieces without a simulator ---------------------------------------------------------


def fake_demos(n: int = 4, task: str = "reach", obs_dim: int = 5, act_dim: int = 2, seed: int = 0) -> Demonstrations:
    rng = np.random.default_rng(seed)
    obs, acts = [], []
    for i in range(n):
        T = 20 + i
        o = rng.normal(size=(T, obs_dim)).astype(np.float32)
        obs.append(o)
        acts.append(np.tanh(o[:, :act_dim]).astype(np.float32))
    return Demonstrations(obs, acts, [task] * n, list(range(n)), [True] * n)


TINY_POLICY = {
    "obs_horizon": 2,
    "pred_horizon": 4,
    "action_horizon": 2,
    "flow": {
        "net": {"width": 16, "depth": 1},
        "blocks": {"schedule": "list", "h": [0.2]},
        "train": {"steps": 30, "batch_size": 32},
        "solver": {"method": "rk4", "steps": 2},
    },
}


def test_normalizer_round_trip() -> None:
    x = np.random.default_rng(0).normal(3, 2, size=(100, 4))
    x[:, 2] = 5.0  # a constant coordinate keeps scale 1
    norm = Normalizer.fit(x)
    t = torch.as_tensor(x)
    assert torch.allclose(norm.inverse(norm(t)), t, atol=1e-12)
    assert float(norm.scale[2]) == 1.0
    assert abs(float(norm(t)[:, 0].mean())) < 1e-9


def test_windows_pad_with_the_first_observation_and_the_last_action() -> None:
    d = fake_demos(1)
    hist, chunks, ep = make_windows(d, 3, 5)
    T = len(d.obs[0])
    assert hist.shape == (T, 3, 5) and chunks.shape == (T, 5, 2) and (ep == 0).all()
    np.testing.assert_array_equal(hist[0], np.stack([d.obs[0][0]] * 3))
    np.testing.assert_array_equal(hist[4], d.obs[0][2:5])
    np.testing.assert_array_equal(chunks[-1], np.stack([d.actions[0][-1]] * 5))


def test_demonstrations_file_round_trip(tmp_path) -> None:
    d = fake_demos(3)
    back = Demonstrations.load(d.save(tmp_path / "d.npz"))
    assert back.tasks == d.tasks and back.seeds == d.seeds
    for a, b in zip(d.obs + d.actions, back.obs + back.actions, strict=True):
        np.testing.assert_array_equal(a, b)


def test_policy_save_load_round_trip_is_exact(tmp_path) -> None:
    demos = fake_demos(3) + fake_demos(3, task="push", seed=1)
    policy = train_policy(demos, TINY_POLICY, seed=0)
    assert policy.multitask and policy.context_dim == 2 * 5 + 2
    policy.save(tmp_path / "p")
    back = load_policy(tmp_path / "p")
    assert back.obs_norm == policy.obs_norm and back.action_norm == policy.action_norm
    assert back.tasks == policy.tasks and back.demo_seeds == policy.demo_seeds
    hist = np.stack([demos.obs[0][:2], demos.obs[4][:2]])
    a = policy.act(hist, ["reach", "push"], generator=torch.Generator().manual_seed(0))
    b = back.act(hist, ["reach", "push"], generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 4, 2)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="tasks"):
        policy.act(hist)
    with pytest.raises(ValueError, match="unknown task"):
        policy.act(hist, ["reach", "door"])


def test_policy_configs_have_equal_total_parameters() -> None:
    """configs/policy_lfm.yaml and policy_fm.yaml: same parameters (within 1%) and network evaluations."""
    from localfm.policy.cli import _param_count

    demos = Demonstrations([np.zeros((3, 39), np.float32)], [np.zeros((3, 4), np.float32)], ["push"], [0], [True])
    lfm = PolicyConfig.load(ROOT / "configs" / "policy_lfm.yaml")
    fm = PolicyConfig.load(ROOT / "configs" / "policy_fm.yaml")
    n_lfm, n_fm = _param_count(lfm, demos), _param_count(fm, demos)
    assert fm.flow.blocks.L == 0 and len(lfm.flow.blocks.steps()) > 1
    assert abs(n_lfm - n_fm) / n_fm < 0.01, (n_lfm, n_fm)
    nfe = lambda c: len(c.flow.blocks.steps()) * c.flow.solver.steps  # noqa: E731
    assert nfe(lfm) == nfe(fm)


def test_policy_config_errors() -> None:
    with pytest.raises(ValueError, match="action_horizon"):
        PolicyConfig(pred_horizon=4, action_horizon=8)
    with pytest.raises(ValueError, match="unknown key"):
        PolicyConfig.load({"obs_horizn": 2})
    with pytest.raises(ValueError, match="context_dim"):
        train_policy(fake_demos(2), dict(TINY_POLICY, flow=dict(TINY_POLICY["flow"], net={"context_dim": 3})))


# --- Meta-World -----------------------------------------------------------------------------------


@needs_metaworld
def test_scripted_expert_solves_a_seeded_episode_and_seeds_fix_the_placement() -> None:
    from localfm.policy import metaworld as mw

    d = mw.collect("push", 1, seed=3)
    assert d.success == [True] and d.seeds == [3] and d.obs_dim == 39 and d.action_dim == 4
    env = mw.make_env("push-v3")
    a, b, c = mw.reset(env, 3), mw.reset(env, 3), mw.reset(env, 4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(a.astype(np.float32), d.obs[0][0])  # demonstrations are stored in float32
    with pytest.raises(ValueError, match="did you mean"):
        mw.canonical_task("pushh")
    assert set(mw.task_names()) >= {"reach", "push", "pick-place", "door-open", "window-close"}
    lo, hi = mw.wilson_interval(45, 50)
    assert lo < 0.9 < hi and 0.77 < lo < 0.8


def localfm_cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "localfm.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"localfm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@needs_metaworld
def test_cli_collect_train_eval(tmp_path) -> None:
    out = localfm_cli("policy", "collect", "--task", "reach", "--episodes", "2", "--out", "d.npz", cwd=tmp_path)
    assert "2 expert episodes of reach" in out.stdout
    localfm_cli(
        "policy",
        "train",
        str(ROOT / "configs" / "policy_lfm.yaml"),
        "--demos",
        "d.npz",
        "--out",
        "pol",
        "--set",
        "flow.train.steps=20",
        "--set",
        "time_budget=null",
        cwd=tmp_path,
    )
    out = localfm_cli("policy", "eval", "pol", "--episodes", "1", "--frames", "2", cwd=tmp_path)
    assert "reach: success" in out.stdout
    metrics = json.loads((tmp_path / "pol" / "eval.json").read_text())
    r = metrics["tasks"]["reach"]
    assert r["episodes"] == 1 and 0 <= r["success_rate"] <= 1 and r["ms_per_action"] > 0
    assert (tmp_path / "pol" / "trajectory.png").is_file()
    # The strip exists wherever an offscreen renderer works; otherwise eval said so.
    assert (tmp_path / "pol" / "rollout.png").is_file() or "no offscreen renderer" in out.stdout
    bad = localfm_cli("policy", "collect", "--task", "pushh", "--episodes", "1", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("localfm: error: unknown Meta-World task")
    bad = localfm_cli(
        "policy", "eval", "pol", "--seed", "0", "--episodes", "2", "--frames", "0", cwd=tmp_path, check=False
    )
    assert bad.returncode == 2 and "demonstrations" in bad.stderr
