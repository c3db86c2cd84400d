"""Images: the UNet velocity network, Hutchinson bits/dim, the classifier and its Frechet distance,
and one tiny image run through ``localfm train``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import F64, make_gen
from torch import nn

import localfm
from localfm import FlowConfig
from localfm.classifier import (
    ClassifierConfig,
    frechet_distance,
    gaussian_frechet_distance,
    load_classifier,
    save_classifier,
    train_classifier,
)
from localfm.config import from_dict
from localfm.datasets import bits_per_dim, dequantize
from localfm.flow import Block, LocalFlow, Standardizer
from localfm.metrics import nll_summary
from localfm.nets import NetConfig, build_net, count_parameters
from localfm.ode import SolverConfig
from localfm.unet import UNet

TINY_UNET = {"kind": "unet", "channels": 8, "channel_mult": [1, 2], "blocks_per_level": 1, "heads": 2}


def tiny_unet(shape=(1, 8, 8), seed: int = 0, **changes) -> UNet:
    """A float64 UNet with every weight random, so the field is far from zero (a fresh one is zero)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_net(shape, from_dict(NetConfig, {**TINY_UNET, "attention_resolutions": [4], **changes})).double()
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn_like(p) * 0.2)
    return net


def tiny_flow(shape=(1, 8, 8), n_blocks: int = 2, solver=SolverConfig("rk4", steps=2)) -> LocalFlow:
    cfg = from_dict(FlowConfig, {"dtype": "float64", "net": {**TINY_UNET, "attention_resolutions": [4]}})
    blocks = [Block(tiny_unet(shape, seed=i), h) for i, h in enumerate([0.1, None][-n_blocks:])]
    std = Standardizer(torch.full(shape, 0.1, dtype=F64), torch.full(shape, 0.5, dtype=F64))
    return LocalFlow(shape, blocks, std, solver, cfg).double()


# --- the UNet -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 12, 12), (1, 7, 9)])
def test_unet_keeps_the_shape_and_depends_on_time(shape) -> None:
    net = tiny_unet(shape, attention_resolutions=[4, 6])
    x = torch.randn(5, *shape, generator=make_gen(0), dtype=F64)
    t = torch.rand(5, generator=make_gen(1), dtype=F64)
    v = net(x, t)
    assert v.shape == x.shape and torch.isfinite(v).all()
    # A 0-d time is broadcast over the batch, and the field changes with t.
    assert torch.allclose(net(x, torch.tensor(0.3, dtype=F64)), net(x, torch.full((5,), 0.3, dtype=F64)))
    assert (net(x, torch.zeros(5, dtype=F64)) - net(x, torch.ones(5, dtype=F64))).abs().max() > 1e-3
    # Each image's velocity depends on that image only (no mixing across the batch).
    assert torch.allclose(net(x[:2], t[:2]), v[:2], atol=1e-12)


def test_fresh_unet_is_the_zero_field_and_attends_where_asked() -> None:
    cfg = NetConfig(kind="unet", channels=8, channel_mult=(1, 2, 2), blocks_per_level=1, attention_resolutions=(4,))
    net = build_net((1, 16, 16), cfg)
    assert torch.equal(net(torch.randn(2, 1, 16, 16), torch.rand(2)), torch.zeros(2, 1, 16, 16))
    kinds = [type(m).__name__ for m in net.modules()]
    assert kinds.count("Attention") == 1 + 1 + 2  # the middle, one encoder and two decoder blocks at 4x4


def test_unet_config_is_validated() -> None:
    with pytest.raises(ValueError, match="net.kind"):
        NetConfig(kind="transformer")
    with pytest.raises(ValueError, match="channel_mult"):
        NetConfig(kind="unet", channel_mult=())
    with pytest.raises(ValueError, match="dropout"):
        NetConfig(kind="unet", dropout=1.0)
    with pytest.raises(ValueError, match="heads"):
        build_net((1, 8, 8), NetConfig(kind="unet", channels=6, heads=4, attention_resolutions=(8,)))
    with pytest.raises(ValueError, match="unet"):
        build_net(16, NetConfig(kind="unet"))
    with pytest.raises(ValueError, match="net.kind: unet"):
        build_net((1, 8, 8), NetConfig())
    with pytest.raises(ValueError, match="shape"):
        tiny_unet()(torch.zeros(2, 1, 8, 9, dtype=F64), torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match="amp|unknown"):
        from_dict(FlowConfig, {"train": {"ampp": True}})
    assert NetConfig() == NetConfig(kind="mlp")  # the MLP default is unchanged


def test_unet_flow_save_load_gives_identical_samples(tmp_path: Path) -> None:
    flow = tiny_flow()
    path = localfm.save(flow, tmp_path / "flow")
    back = localfm.load(path)
    assert isinstance(back.blocks[0].net, UNet)
    a = flow.sample(3, generator=make_gen(5))
    b = back.sample(3, generator=make_gen(5))
    assert torch.equal(a, b)
    x = a.clone()
    assert torch.equal(flow.log_prob(x, generator=make_gen(6)), back.log_prob(x, generator=make_gen(6)))


# --- Hutchinson bits/dim --------------------------------------------------------------------


class Flat(nn.Module):
    """The same field on flattened points, so the exact divergence can be taken."""

    def __init__(self, net: nn.Module, shape) -> None:
        super().__init__()
        self.net, self.shape = net, shape

    def forward(self, x, t):
        return self.net(x.reshape(-1, *self.shape), t).flatten(1)


def test_hutchinson_log_prob_is_unbiased_for_a_unet_flow() -> None:
    shape = (1, 4, 4)
    flow = tiny_flow(shape, n_blocks=1, solver=SolverConfig("rk4", steps=2))
    flat = LocalFlow((16,), [Block(Flat(flow.blocks[0].net, shape), 0.1)], solver=flow.solver).double()
    flat.standardizer = Standardizer(flow.standardizer.mean.flatten(), flow.standardizer.scale.flatten())
    x = torch.randn(1, *shape, generator=make_gen(3), dtype=F64)
    exact = flat.log_prob(x.flatten(1), divergence="exact")
    # Each row of a batch gets its own probe: the mean over 256 copies estimates the exact value.
    est = flow.log_prob(x.expand(256, *shape), divergence="hutchinson", generator=make_gen(4))
    se = est.std() / math.sqrt(len(est))
    assert se > 0 and abs(float(est.mean() - exact)) < 4 * float(se) + 1e-9


def test_bits_per_dim_of_dequantised_images_is_finite_with_a_standard_error() -> None:
    flow = tiny_flow()
    k = np.random.default_rng(0).integers(0, 17, size=(40, 1, 8, 8))
    x = dequantize(k, np.random.default_rng(1), levels=17)
    assert x.min() >= -1 and x.max() < 1
    s = nll_summary(flow.log_prob(torch.from_numpy(x).double(), generator=make_gen(2)))
    bpd = float(bits_per_dim(s["nll"], 64, levels=17))
    se = s["nll_se"] / (64 * math.log(2))
    assert math.isfinite(bpd) and 0 < se < math.inf


# --- classifier and classifier Frechet distance ---------------------------------------------


@pytest.fixture(scope="module")
def digits():
    from localfm.datasets import load

    return load("digits")


def test_classifier_training_is_deterministic_and_round_trips(digits, tmp_path: Path) -> None:
    x, y = digits.train[:300], digits.labels.train[:300]
    cfg = ClassifierConfig(channels=(8, 16), features=32, epochs=8, batch_size=32, seed=3)
    a = train_classifier(x, y, cfg, x_test=digits.test, y_test=digits.labels.test)
    b = train_classifier(x, y, cfg)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    c = train_classifier(x, y, ClassifierConfig(channels=(8, 16), features=32, epochs=1, batch_size=32, seed=4))
    assert not torch.equal(a.hidden.weight, c.hidden.weight)
    assert a.info["test_accuracy"] > 0.3  # 10 classes: well above chance after 75 short steps
    back = load_classifier(save_classifier(a, tmp_path / "clf"))
    assert np.array_equal(back.embed(digits.test[:20]), a.embed(digits.test[:20]))
    assert back.info["test_accuracy"] == a.info["test_accuracy"]


def test_gaussian_frechet_distance_closed_forms() -> None:
    rng = np.random.default_rng(0)
    f = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    assert gaussian_frechet_distance(f, f) < 1e-8
    shift = np.arange(6.0)
    assert gaussian_frechet_distance(f, f + shift) == pytest.approx((shift**2).sum(), rel=1e-6)
    # Scaling the features by s: the trace term is (1 - s)^2 tr(S).
    s, cov = 2.0, np.cov(f, rowvar=False)
    assert gaussian_frechet_distance(f, s * f) == pytest.approx(
        ((1 - s) ** 2) * (f.mean(0) ** 2).sum() + (1 - s) ** 2 * np.trace(cov), rel=1e-6
    )


def test_classifier_frechet_distance_is_zero_for_equal_sets_and_grows_with_a_shift(digits) -> None:
    clf = train_classifier(
        digits.train[:200], digits.labels.train[:200], ClassifierConfig(channels=(4, 8), features=16, epochs=1)
    )
    x = digits.test
    assert frechet_distance(x, x, clf) < 1e-6
    shifted = np.clip(x + 0.5, -1, 1)
    assert frechet_distance(shifted, x, clf) > 10 * frechet_distance(x[:90], x[90:], clf)


# --- a tiny image run through the command line ----------------------------------------------

TINY_RUN = """
data: digits
data_limit: 400
net: {kind: unet, channels: 8, channel_mult: [1, 2], blocks_per_level: 1, attention_resolutions: [4], heads: 2}
blocks: {schedule: list, h: [0.15], free_block: true}
train: {steps: 12, batch_size: 32, lr: 2.0e-3, warmup: 3, grad_clip: 1.0, ema: 0.99, interpolant: linear,
        log_every: 4, amp: true, push_batch_size: 400}
solver: {method: euler, steps: 2}
"""


def test_tiny_image_run_through_localfm_train(tmp_path: Path) -> None:
    (tmp_path / "digits.yaml").write_text(TINY_RUN)
    env = dict(os.environ, OMP_NUM_THREADS="1", LOCALFM_DATA=str(tmp_path / "data"))
    proc = subprocess.run(
        [sys.executable, "-m", "localfm.cli", "-v", "train", "digits.yaml", "--out", "run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train.amp is ignored on cpu" in proc.stderr
    run = tmp_path / "run"
    m = json.loads((run / "metrics.json").read_text())
    assert math.isfinite(m["bits_per_dim"]) and m["bits_per_dim_se"] > 0 and m["levels"] == 17
    assert m["classifier_frechet_distance"] > m["classifier_frechet_floor"] >= 0
    assert m["classifier_frechet_points"] == [180, 180]
    assert "bits/dim" in proc.stdout and "classifier Frechet distance" in proc.stdout
    assert all((run / "plots" / f).is_file() for f in ("samples.png", "blocks.png", "losses.png"))
    report = (run / "report.md").read_text()
    assert "classifier Frechet distance (not FID)" in report and "FID " not in report.replace("(not FID)", "")
    assert localfm.load(run / "model").blocks[0].net.__class__ is UNet
    proc = subprocess.run(
        [sys.executable, "-m", "localfm.cli", "sample", "run", "-n", "3", "--out", "s.csv"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0 and "shape (1, 8, 8)" in proc.stdout, proc.stderr[-2000:]
    rows = (tmp_path / "s.csv").read_text().splitlines()
    assert len(rows) == 4 and all(len(r.split(",")) == 64 for r in rows)
    assert json.loads((run / "run.json").read_text())["dataset"]["name"] == "digits"


@pytest.mark.parametrize(
    ("lfm", "fm", "shape"),
    [("fashion_mnist_cpu", "fashion_mnist_cpu_fm", (1, 28, 28)), ("cifar10", "cifar10_fm", (3, 32, 32))],
)
def test_image_configs_pair_lfm_with_an_fm_twin_of_equal_size(lfm: str, fm: str, shape) -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    total = {}
    for name in (lfm, fm):
        cfg = localfm.load_config(root / f"{name}.yaml")
        assert cfg.net.kind == "unet" and cfg.train.interpolant == "linear" and cfg.train.grad_clip == 1.0
        assert cfg.train.ema and cfg.train.warmup > 0 and cfg.train.amp
        with torch.device("meta"):
            per_block = count_parameters(build_net(shape, cfg.net))
        hs = cfg.blocks.steps()
        total[name] = per_block * len(hs)
        steps = sum(cfg.train.steps_for(len(hs)))
        if name == lfm:
            assert hs == [0.1, 0.15, 0.225, None]
        else:
            assert hs == [None]
        total[name + " steps"] = steps
    assert abs(total[lfm] / total[fm] - 1) < 0.02  # equal total parameters
    assert total[lfm + " steps"] == total[fm + " steps"]  # and equal numbers of training batches
