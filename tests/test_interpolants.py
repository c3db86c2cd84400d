"""Interpolants: endpoints, time derivative against autograd; the law of the training time."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import F64, make_gen, randn
from scipy import stats

from localfm.interpolants import LinearInterpolant, TimeSampler, TrigInterpolant, get_interpolant

NAMES = ["trig", "linear"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(5, 3), (4, 2, 3, 3)])
def test_endpoints(name, shape, gen):
    interp = get_interpolant(name)
    x_l, x_r = randn(*shape, generator=gen), randn(*shape, generator=gen)
    B = shape[0]
    torch.testing.assert_close(interp.x_t(x_l, x_r, torch.zeros(B, dtype=F64)), x_l, rtol=0, atol=1e-15)
    torch.testing.assert_close(interp.x_t(x_l, x_r, torch.ones(B, dtype=F64)), x_r, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(6, 3), (4, 2, 3, 3)])
def test_dx_t_is_the_time_derivative(name, shape, gen):
    """``dx_t`` equals autograd's d/dt of ``x_t``, point by point, each with its own t."""
    interp = get_interpolant(name)
    x_l, x_r = randn(*shape, generator=gen), randn(*shape, generator=gen)
    t = torch.rand(shape[0], generator=gen, dtype=F64)
    # x_t of point b depends on t_b only, so a JVP with a vector of ones gives every d/dt_b at once.
    _, dxdt = torch.autograd.functional.jvp(lambda s: interp.x_t(x_l, x_r, s), t, torch.ones_like(t))
    torch.testing.assert_close(interp.dx_t(x_l, x_r, t), dxdt, rtol=1e-12, atol=1e-12)


def test_trig_and_linear_formulas(gen):
    x_l, x_r = randn(3, 4, generator=gen), randn(3, 4, generator=gen)
    t = torch.full((3,), 0.5, dtype=F64)
    torch.testing.assert_close(TrigInterpolant().x_t(x_l, x_r, t), (x_l + x_r) / math.sqrt(2))
    torch.testing.assert_close(LinearInterpolant().x_t(x_l, x_r, t), (x_l + x_r) / 2)
    torch.testing.assert_close(TrigInterpolant().dx_t(x_l, x_r, torch.zeros(3, dtype=F64)), math.pi / 2 * x_r)
    torch.testing.assert_close(LinearInterpolant().dx_t(x_l, x_r, t), x_r - x_l)


def test_trig_keeps_the_second_moment(gen):
    """With x_l, x_r independent standard normals, trig's x_t is standard normal for every t."""
    n = 200_000
    x_l, x_r = randn(n, 1, generator=gen), randn(n, 1, generator=gen)
    for s in (0.1, 0.37, 0.8):
        x_t = TrigInterpolant().x_t(x_l, x_r, torch.full((n,), s, dtype=F64))
        assert abs(float(x_t.var()) - 1) < 5 * math.sqrt(2 / n)


def test_unknown_interpolant_names_the_argument():
    with pytest.raises(ValueError, match="interpolant.*'cosine'"):
        get_interpolant("cosine")


@pytest.mark.parametrize(("a", "b"), [(1.0, 1.0), (1.0, 0.5), (2.0, 3.0), (0.5, 0.5), (0.3, 4.0)])
def test_beta_time_moments_and_law(a, b):
    """Mean and variance against the Beta formulas (within 4 standard errors) and a KS test."""
    n = 100_000
    t = TimeSampler("beta", a, b).sample(n, generator=make_gen(3), dtype=F64)
    assert t.dtype == F64 and t.shape == (n,)
    assert float(t.min()) >= 0 and float(t.max()) <= 1
    mean = a / (a + b)
    var = a * b / ((a + b) ** 2 * (a + b + 1))
    assert abs(float(t.mean()) - mean) < 4 * math.sqrt(var / n)
    dev2 = (t - mean) ** 2
    assert abs(float(dev2.mean()) - var) < 4 * float(dev2.std()) / math.sqrt(n)
    assert stats.kstest(t.numpy(), stats.beta(a, b).cdf).pvalue > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_beta_time_with_small_parameters_stays_finite(dtype):
    """Gamma draws of shape << 1 underflow; the Beta draws must not turn into 0 / 0."""
    t = TimeSampler("beta", 0.02, 0.02).sample(100_000, generator=make_gen(5), dtype=dtype)
    assert t.dtype == dtype and torch.isfinite(t).all()
    assert float(t.min()) >= 0 and float(t.max()) <= 1
    assert abs(float(t.double().mean()) - 0.5) < 4 * math.sqrt(0.25 / t.numel())


def test_uniform_time_law():
    n = 100_000
    t = TimeSampler().sample(n, generator=make_gen(4), dtype=F64)
    assert abs(float(t.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / n)
    assert stats.kstest(t.numpy(), "uniform").pvalue > 1e-3


@pytest.mark.parametrize("dist", ["uniform", "beta"])
def test_time_sampler_seeded_and_independent(dist):
    sampler = TimeSampler(dist, 1.0, 0.5)
    a = sampler.sample(5000, generator=make_gen(9), dtype=F64)
    b = sampler.sample(5000, generator=make_gen(9), dtype=F64)
    c = sampler.sample(5000, generator=make_gen(10), dtype=F64)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Successive draws from one generator are independent: no lag-1 correlation.
    g = make_gen(11)
    t1, t2 = sampler.sample(20_000, generator=g, dtype=F64), sampler.sample(20_000, generator=g, dtype=F64)
    for u, v in ((t1, t2), (t1[:-1], t1[1:])):
        r = float(torch.corrcoef(torch.stack([u, v]))[0, 1])
        assert abs(r) < 4 / math.sqrt(u.numel())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dist": "normal"}, "time distribution"),
        ({"dist": "beta", "a": 0.0}, "a > 0"),
        ({"dist": "beta", "b": -1.0}, "b"),
    ],
)
def test_time_sampler_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TimeSampler(**kwargs)
