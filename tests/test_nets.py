"""Velocity networks: random Fourier features of x (``net.x_fourier``)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import F64, make_gen, randn, tiny_config

import localfm
from localfm.nets import MLP, NetConfig
from localfm.ode import divergence_exact

FF = NetConfig(width=16, depth=2, activation="tanh", x_fourier=6, x_fourier_scale=3.0)


def test_fourier_features_enter_the_first_layer_and_keep_the_divergence_exact():
    torch.manual_seed(1)
    net = MLP(3, FF).double()
    assert net.x_freqs.shape == (3, 6)
    assert net.layers[0].in_features == 3 + 2 * 6 + 1
    # The frequencies have the asked scale (18 draws of N(0, 9): std within a loose band).
    assert 1.5 < float(net.x_freqs.std()) < 5.0
    x, t = randn(5, 3, generator=make_gen(2)), torch.full((), 0.3, dtype=F64)
    _, div = divergence_exact(lambda y: net(y, t), x)
    for b in range(5):
        J = torch.autograd.functional.jacobian(lambda y: net(y[None], t)[0], x[b])
        torch.testing.assert_close(div[b], torch.trace(J), rtol=0, atol=1e-10)


def test_the_features_make_the_field_vary_faster():
    """High frequencies in the input let a random network vary on a finer scale along x."""

    def roughness(cfg: NetConfig) -> float:
        torch.manual_seed(0)
        net = MLP(1, cfg).double()
        x = torch.linspace(-2, 2, 2001, dtype=F64)[:, None]
        v = net(x, torch.zeros((), dtype=F64))[:, 0].detach()
        return float((v.diff().abs().sum() / (v.max() - v.min())).item())

    plain = NetConfig(width=64, depth=2, activation="tanh")
    assert roughness(NetConfig(**{**plain.__dict__, "x_fourier": 32, "x_fourier_scale": 20.0})) > 3 * roughness(plain)


def test_fourier_features_are_seeded_saved_and_loaded(tmp_path):
    cfg = tiny_config(net={"width": 16, "depth": 2, "activation": "tanh", "x_fourier": 4, "x_fourier_scale": 2.0})
    x = randn(256, 2, generator=make_gen(3))
    a, b = localfm.fit(x, cfg, seed=5), localfm.fit(x, cfg, seed=5)
    torch.testing.assert_close(a.blocks[0].net.x_freqs, b.blocks[0].net.x_freqs, rtol=0, atol=0)
    assert not torch.equal(a.blocks[0].net.x_freqs, localfm.fit(x, cfg, seed=6).blocks[0].net.x_freqs)
    loaded = localfm.load(localfm.save(a, tmp_path / "model"))
    probe = x[:8]
    torch.testing.assert_close(loaded.log_prob(probe), a.log_prob(probe), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [{"x_fourier": -1}, {"x_fourier_scale": 0.0}, {"x_fourier_scale": math.inf}])
def test_bad_fourier_settings_are_refused(bad):
    with pytest.raises(ValueError, match="x_fourier"):
        NetConfig(**bad)
