"""Block-wise training: pairs, time draws, frozen blocks, pushforward, seeding, resume, Gaussian case."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import F64, assert_same_params, make_gen, params_of, randn, tiny_config
from torch import nn

import localfm
from localfm import training
from localfm.config import TrainConfig
from localfm.nets import MLP, NetConfig
from localfm.schedules import ou_step


def data(n: int = 256, seed: int = 0) -> torch.Tensor:
    g = make_gen(seed)
    x = randn(n, 2, generator=g)
    return torch.stack([2 * x[:, 0] + 1, x[:, 0] * x[:, 1] + 0.5 * x[:, 1] ** 2], dim=1)


# --- pairs and times --------------------------------------------------------------------------


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


@pytest.mark.parametrize("pairing", ["dependent", "shuffled", "independent"])
def test_draw_pairs_laws(pairing):
    n, h = 20_000, 0.3
    pool = randn(n, 2, generator=make_gen(1))
    tc = TrainConfig(batch_size=n, pairing=pairing)
    x_l, x_r = training.draw_pairs(pool, h, tc, make_gen(2))
    assert abs(float(x_r.var()) - 1) < 0.05  # x_r has the OU-smoothed law: N(0, I) stays N(0, I)
    expected = math.exp(-h) if pairing == "dependent" else 0.0
    assert corr(x_l, x_r) == pytest.approx(expected, abs=4 / math.sqrt(2 * n))
    if pairing == "dependent":
        # x_r is made from x_l itself: replay the generator to get the same indices and noise.
        g = make_gen(2)
        idx = torch.randint(n, (n,), generator=g)
        z = torch.randn((n, 2), generator=g, dtype=F64)
        assert torch.equal(x_l, pool[idx]) and torch.equal(x_r, ou_step(pool[idx], h, z))


def test_free_block_pairs_are_independent_gaussians():
    n = 20_000
    pool = randn(n, 2, generator=make_gen(3)) * 3 + 1
    x_l, x_r = training.draw_pairs(pool, None, TrainConfig(batch_size=n), make_gen(4))
    assert abs(corr(x_l, x_r)) < 4 / math.sqrt(2 * n)
    assert abs(float(x_r.mean())) < 0.05 and abs(float(x_r.var()) - 1) < 0.05


class Recorder(nn.Module):
    """An MLP that records the (x, t) it is trained on."""

    def __init__(self, dim, cfg) -> None:
        super().__init__()
        self.net = MLP(dim, cfg.net)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t):
        if torch.is_grad_enabled():
            self.seen.append((x.detach().clone(), t.detach().clone()))
        return self.net(x, t)


def test_draws_per_pair_share_the_pair_with_independent_times():
    K, B = 3, 64
    train = {"draws_per_pair": K, "batch_size": B, "steps": 15, "interpolant": "trig"}
    cfg = tiny_config(train=train, blocks={"h": [], "free_block": True})
    nets = []
    localfm.fit(data(), cfg, net_factory=lambda d, c: nets.append(Recorder(d, c)) or nets[-1])
    (rec,) = nets
    assert len(rec.seen) == 15
    xs = torch.stack([x.reshape(K, B, 2) for x, _ in rec.seen], 1).reshape(K, -1, 2)
    ts = torch.stack([t.reshape(K, B) for _, t in rec.seen], 1).reshape(K, -1)
    assert abs(corr(ts[0], ts[1])) < 4 / math.sqrt(ts.shape[1]) and abs(corr(ts[0], ts[2])) < 4 / math.sqrt(ts.shape[1])
    # Copies 0 and 1 determine (x_l, x_r) through the trig interpolant; copy 2 must be the same pair.
    a = ts * (math.pi / 2)
    ok = torch.sin(a[1] - a[0]).abs() > 0.2
    det = torch.sin(a[1] - a[0])[ok, None]
    x_l = (xs[0][ok] * torch.sin(a[1][ok, None]) - xs[1][ok] * torch.sin(a[0][ok, None])) / det
    x_r = (xs[1][ok] * torch.cos(a[0][ok, None]) - xs[0][ok] * torch.cos(a[1][ok, None])) / det
    pred = torch.cos(a[2][ok, None]) * x_l + torch.sin(a[2][ok, None]) * x_r
    assert ok.sum() > 100
    torch.testing.assert_close(pred, xs[2][ok], rtol=0, atol=1e-9)


# --- blocks: gradients, frozen weights, pushforward -------------------------------------------


@pytest.mark.parametrize("warm_start", [True, False])
def test_gradients_reach_only_the_block_in_training(warm_start, monkeypatch):
    cfg = tiny_config(
        train={"warm_start": warm_start, "log_every": 1, "steps": 12}, blocks={"h": [0.2, 0.3], "free_block": True}
    )
    nets, grads, snapshots = [], [], []

    def factory(d, c):
        net = MLP(d, c.net)
        k = len(nets)
        for p in net.parameters():
            p.register_hook(lambda g, k=k: grads.append(k))
        nets.append(net)
        return net

    def callback(p):
        if p.phase == "train":
            owners = set(grads)
            grads.clear()
            # With warm start only block 0 comes from the factory; later blocks are copies of it.
            assert owners == ({p.block} if not warm_start or p.block == 0 else set()), (p.block, owners)

    orig_push = training.push

    def push(block, pool, *args, **kw):
        out = orig_push(block, pool, *args, **kw)
        snapshots.append((block.net, params_of(block.net)))  # the block as its training left it
        return out

    monkeypatch.setattr(training, "push", push)
    flow = localfm.fit(data(), cfg, net_factory=factory, callback=callback)
    # The last block is not pushed: nothing trains on the pool after it.
    assert len(flow) == 3 and len(snapshots) == 2 and len(nets) == (1 if warm_start else 3)
    for n, (net, before) in enumerate(snapshots):
        assert flow[n].net is net
        # Frozen blocks are bit-identical at the end to what they were when their training ended.
        for k, v in net.state_dict().items():
            assert torch.equal(v, before[k]), (n, k)
    # Each trained block moved away from where it started (the warm start is its predecessor).
    for n in (1, 2):
        diff = [
            float((a - b).detach().abs().max())
            for a, b in zip(flow[n].net.parameters(), flow[n - 1].net.parameters(), strict=True)
        ]
        assert min(diff) > 0


def test_train_block_updates_every_parameter_and_ends_on_the_ema():
    pool = randn(128, 2, generator=make_gen(5))
    net = MLP(2, NetConfig(width=8, depth=2, activation="tanh")).double()
    before = params_of(net)
    tc = TrainConfig(steps=10, batch_size=32, lr=1e-2, ema=0.9, log_every=5)
    state = training.train_block(training.new_block_state(net, tc), pool, 0.2, tc, 10, generator=make_gen(6))
    assert state.step == 10 and [s for s, _ in state.losses] == [5, 10]
    for k, p in net.named_parameters():
        assert not torch.equal(p, before[k]), k
        assert torch.equal(p.detach(), state.ema[k]), k
    assert not net.training


def test_learning_rate_schedules():
    lr = training.lr_factor
    tc = TrainConfig(lr_schedule="cosine", warmup=4, min_lr_ratio=0.1)
    assert [lr(s, 100, tc) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr(4, 100, tc) == pytest.approx(1.0) and lr(100, 100, tc) == pytest.approx(0.1)
    assert lr(52, 100, tc) == pytest.approx(0.1 + 0.9 * 0.5)
    tc = TrainConfig(lr_schedule="step", step_size=10, gamma=0.5)
    assert [lr(s, 100, tc) for s in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]
    assert lr(50, 100, TrainConfig(lr_schedule="constant")) == 1.0


def test_training_a_later_block_leaves_earlier_blocks_unchanged():
    """Block 0 of a 2-block run equals the only block of a 1-block run of the same seed, bit for bit."""
    x = data()
    two = localfm.fit(x, tiny_config(blocks={"h": [0.2], "free_block": True}, train={"steps": [20, 20]}))
    one = localfm.fit(x, tiny_config(blocks={"h": [0.2], "free_block": False}, train={"steps": [20]}))
    assert_same_params(two[0], one[0])
    assert not torch.equal(two[1].net.layers[0].weight, two[0].net.layers[0].weight)


@pytest.mark.parametrize("grid_power", [1.0, [3.0, 1.0]])
def test_each_block_trains_on_the_pool_pushed_through_the_previous_blocks(monkeypatch, tmp_path, grid_power):
    """With per-block grids each push uses its own block's solver (a wrong grid moves the pool by ~1e-4)."""
    pools = []
    orig = training.train_block

    def spy(state, pool, *args, **kw):
        pools.append(pool.clone())
        return orig(state, pool, *args, **kw)

    monkeypatch.setattr(training, "train_block", spy)
    x = data()
    solver = {"method": "rk4", "steps": 2, "grid_power": grid_power}
    flow = localfm.fit(x, tiny_config(blocks={"h": [0.2, 0.3], "free_block": True}, solver=solver))
    assert len(pools) == 3
    assert torch.equal(pools[0], flow.standardizer(x))
    for n in (1, 2):
        pushed = flow[n - 1].forward(pools[n - 1], solver=flow.solver.for_block(n - 1)).x
        torch.testing.assert_close(pools[n], pushed, rtol=0, atol=1e-12)
    assert [e["block"] for e in flow.training_log] == [0, 1, 2]
    assert [e["h"] for e in flow.training_log] == [0.2, 0.3, None]
    flow.save(tmp_path / "run")  # the per-block grid survives a checkpoint
    assert localfm.load(tmp_path / "run").solver == flow.solver


# --- seeding ------------------------------------------------------------------------------------


def test_seeded_fit_and_sample_are_reproducible():
    x = data()
    cfg = tiny_config(blocks={"h": [0.2], "free_block": True})
    a, b = localfm.fit(x, cfg), localfm.fit(x, cfg)
    assert_same_params(a, b)
    assert torch.equal(a.sample(50, generator=make_gen(5)), b.sample(50, generator=make_gen(5)))
    c = localfm.fit(x, cfg, seed=1)
    assert not torch.equal(a[0].net.layers[0].weight, c[0].net.layers[0].weight)
    assert a[0].net.layers[0].weight.dtype == F64


# --- resume -------------------------------------------------------------------------------------


def resume_config(**train):
    return tiny_config(
        blocks={"h": [0.2], "free_block": True},
        train={"steps": 20, "checkpoint_every": 5, "log_every": 1, "keep_checkpoints": 20, **train},
    )


def interrupt_at(block: int, step: int, phase: str = "train"):
    def callback(p):
        if p.phase == phase and p.block == block and p.step >= step:
            raise KeyboardInterrupt

    return callback


def record_steps(steps: list):
    def callback(p):
        if p.phase == "train":
            steps.append((p.block, p.step))

    return callback


@pytest.mark.parametrize(
    ("block", "step", "phase", "extra", "first"),
    [
        (0, 12, "train", {}, (0, 11)),
        (1, 10, "train", {}, (1, 6)),  # stopped in the report before step 10's checkpoint
        (1, 17, "train", {"ema": 0.9, "pairing": "shuffled", "lr_schedule": "cosine", "draws_per_pair": 2}, (1, 16)),
        (0, 1, "push", {}, (0, 16)),
        (1, 12, "train", {"push_points": 100}, (1, 11)),  # the saved pool is the pushed subset
    ],
)
def test_resume_after_an_interruption_matches_an_uninterrupted_run(tmp_path, block, step, phase, extra, first):
    x = data()
    cfg = resume_config(**extra)
    reference = localfm.fit(x, cfg)
    with pytest.raises(KeyboardInterrupt):
        localfm.fit(x, cfg, run_dir=tmp_path, callback=interrupt_at(block, step, phase))
    steps = []
    resumed = localfm.fit(x, cfg, run_dir=tmp_path, resume=True, callback=record_steps(steps))
    assert steps[0] == first  # it continued from the newest checkpoint, not from scratch
    assert_same_params(resumed, reference)
    assert torch.equal(resumed.sample(20, generator=make_gen(6)), reference.sample(20, generator=make_gen(6)))


@pytest.mark.parametrize(("drop", "first"), [(1, (1, 16)), (2, (1, 11)), (4, (1, 1))])
def test_resume_after_losing_the_newest_checkpoints(tmp_path, drop, first):
    x = data()
    cfg = resume_config()
    reference = localfm.fit(x, cfg, run_dir=tmp_path)
    folders = sorted((tmp_path / "checkpoints").glob("b*-s*"))
    assert len(folders) >= 6
    for d in folders[-drop:]:
        shutil.rmtree(d)
    steps = []
    resumed = localfm.fit(x, cfg, run_dir=tmp_path, resume=True, callback=record_steps(steps))
    assert steps[0] == first
    assert_same_params(resumed, reference)


def test_resume_of_a_finished_run_returns_it(tmp_path):
    x = data()
    cfg = resume_config()
    reference = localfm.fit(x, cfg, run_dir=tmp_path)
    steps = []
    resumed = localfm.fit(x, cfg, run_dir=tmp_path, resume=True, callback=record_steps(steps))
    assert steps == []
    assert_same_params(resumed, reference)
    assert torch.equal(resumed.log_prob(x[:10]), reference.log_prob(x[:10]))


def test_resume_of_an_empty_folder_is_a_fresh_run(tmp_path):
    x = data()
    cfg = resume_config()
    assert_same_params(localfm.fit(x, cfg, run_dir=tmp_path, resume=True), localfm.fit(x, cfg))


# --- bad inputs ---------------------------------------------------------------------------------


def test_fit_rejects_bad_inputs(tmp_path):
    cfg = tiny_config()
    x = data(16)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"x_train has a non-finite value nan at index \(3, 1\)"):
        localfm.fit(bad, cfg)
    with pytest.raises(ValueError, match="x_train needs at least 2 points"):
        localfm.fit(x[:1], cfg)
    with pytest.raises(ValueError, match="x_train must have shape"):
        localfm.fit(x[:, 0], cfg)
    with pytest.raises(TypeError, match="x_train"):
        localfm.fit("data.csv", cfg)
    with pytest.raises(ValueError, match="resume=True needs run_dir"):
        localfm.fit(x, cfg, resume=True)
    with pytest.raises(ValueError, match="time_budget"):
        localfm.fit(x, cfg, time_budget=-1.0)
    with pytest.raises(ValueError, match="did you mean 'train'"):
        localfm.fit(x, {"trian": {"steps": 3}})
    with pytest.raises(ValueError, match="train.steps lists 3 values but the flow has 2 blocks"):
        localfm.fit(x, tiny_config(train={"steps": [1, 2, 3]}))


# --- closed-form Gaussian end to end ------------------------------------------------------------


def gaussian_entropy(cov: torch.Tensor) -> float:
    d = cov.shape[0]
    return 0.5 * (d * math.log(2 * math.pi * math.e) + float(torch.logdet(cov)))


@pytest.mark.slow
@pytest.mark.parametrize("L", [2, 0], ids=["LFM", "FM"])
def test_gaussian_test_nll_near_the_entropy(gaussian_data, L):
    """A 2-D correlated Gaussian: test NLL within a loose tolerance of the true entropy.

    ``L = 0`` is the FM baseline (one free block), through the same code.
    """
    mean, cov, x_train, x_test = gaussian_data
    cfg = tiny_config(
        net={"width": 32, "depth": 2, "activation": "softplus"},
        blocks={"schedule": "constant", "h": [], "c": 0.3, "L": L, "free_block": True},
        train={"steps": 250 if L else 400, "batch_size": 256, "lr": 5e-3, "lr_schedule": "cosine"},
        solver={"method": "rk4", "steps": 8},
    )
    flow = localfm.fit(x_train, cfg)
    assert len(flow) == L + 1 and flow[-1].h is None
    lp = flow.log_prob(x_test)
    true = torch.distributions.MultivariateNormal(mean, cov).log_prob(x_test)
    gap = float((true - lp).mean())  # an estimate of KL(p || model) >= 0
    assert float(-true.mean()) == pytest.approx(gaussian_entropy(cov), abs=0.1)
    assert -0.02 < gap < 0.05, gap
    # Samples have the right mean and covariance.
    s = flow.sample(4000, generator=make_gen(8))
    torch.testing.assert_close(s.mean(0), mean, rtol=0, atol=0.1)
    torch.testing.assert_close(torch.cov(s.T), cov, rtol=0, atol=0.15)


# --- push_points -------------------------------------------------------------------------------


def test_push_points_pushes_a_fixed_subset_that_later_blocks_train_on(monkeypatch):
    x = data(300)
    cfg = tiny_config(blocks={"h": [0.2, 0.3], "free_block": True}, train={"steps": 10, "push_points": 120})
    pushed = []
    real_push = training.push

    def spy(block, pool, *args, **kwargs):
        pushed.append(pool.clone())
        return real_push(block, pool, *args, **kwargs)

    monkeypatch.setattr(training, "push", spy)
    flow = localfm.fit(x, cfg, seed=3)
    assert [p.shape[0] for p in pushed] == [120, 120]
    # The first push takes 120 distinct training points (standardised), the second their images.
    z = flow.standardizer(x)
    rows = [int(torch.nonzero((z == r).all(1))[0]) for r in pushed[0]]
    assert len(set(rows)) == 120
    torch.testing.assert_close(flow.blocks[0].forward(pushed[0], solver=cfg.solver).x, pushed[1])
    first = pushed[0]
    pushed.clear()
    localfm.fit(x, cfg, seed=3)
    assert torch.equal(pushed[0], first)  # the same subset again: fixed by the seed


def test_push_points_with_a_context_resumes_exactly(tmp_path):
    x = data(300)
    c = (x[:, :1] > 1).to(F64)
    cfg = tiny_config(
        net={"width": 16, "depth": 2, "activation": "tanh", "context_dim": 1},
        blocks={"h": [0.2], "free_block": True},
        train={"steps": 20, "checkpoint_every": 5, "log_every": 1, "keep_checkpoints": 20, "push_points": 90},
    )
    reference = localfm.fit(x, cfg, context=c)
    with pytest.raises(KeyboardInterrupt):
        localfm.fit(x, cfg, context=c, run_dir=tmp_path, callback=interrupt_at(1, 12))
    resumed = localfm.fit(x, cfg, context=c, run_dir=tmp_path, resume=True)
    assert_same_params(resumed, reference)


def test_push_points_is_validated():
    with pytest.raises(ValueError, match="push_points"):
        TrainConfig(push_points=1)


# --- subnormal floats -------------------------------------------------------------------------


@pytest.mark.parametrize("before", [False, True])
def test_fit_flushes_subnormals_and_restores_the_setting(before):
    """fit trains with subnormal floats flushed to zero (sharp softplus makes them, and the CPU is
    slow with them) and leaves the process's setting as it found it."""
    subnormal = torch.tensor([1e-40], dtype=torch.float32)
    seen = []
    torch.set_flush_denormal(before)
    try:
        cfg = tiny_config(train={"steps": 3, "log_every": 1}, blocks={"h": [0.2], "free_block": True})
        localfm.fit(data(), cfg, callback=lambda p: seen.append(subnormal.mul(1.0).item()))
        after = subnormal.mul(1.0).item()
    finally:
        torch.set_flush_denormal(False)
    assert seen and all(v == 0.0 for v in seen)
    assert (after == 0.0) == before
