"""OU transition and the block step sizes."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import F64, make_gen, randn

from localfm.schedules import block_steps, geometric_steps, ou_step


@pytest.mark.parametrize("h", [0.02, 0.3, 2.0])
def test_ou_step_mean_and_variance(h):
    """Monte Carlo mean e^{-h} x and variance 1 - e^{-2h}, within 4 standard errors per coordinate."""
    n = 100_000
    x = torch.tensor([[1.5, -0.7, 0.0]], dtype=F64).expand(n, 3)
    y = ou_step(x, h, randn(n, 3, generator=make_gen(5)))
    var = 1 - math.exp(-2 * h)
    mean_err = (y.mean(0) - math.exp(-h) * x[0]).abs()
    assert (mean_err < 4 * math.sqrt(var / n)).all(), mean_err
    var_err = (y.var(0) - var).abs()
    assert (var_err < 4 * var * math.sqrt(2 / n)).all(), var_err


def test_ou_step_exact_parts(gen):
    x, z = randn(4, 2, generator=gen), randn(4, 2, generator=gen)
    h = 0.4
    torch.testing.assert_close(ou_step(x, h, torch.zeros_like(x)), math.exp(-h) * x, rtol=1e-15, atol=0)
    torch.testing.assert_close(ou_step(torch.zeros_like(x), h, z), math.sqrt(1 - math.exp(-2 * h)) * z)
    # Tiny steps keep full relative precision in the noise scale (expm1, not 1 - exp).
    tiny = 1e-12
    torch.testing.assert_close(ou_step(torch.zeros_like(x), tiny, z), math.sqrt(2 * tiny) * z, rtol=1e-10, atol=0)


def test_ou_steps_compose_and_keep_the_gaussian():
    """Two steps h1, h2 have the law of one step h1 + h2; N(0, I) is stationary."""
    n = 100_000
    g = make_gen(6)
    x = torch.full((n, 1), 2.0, dtype=F64)
    y = ou_step(ou_step(x, 0.3, randn(n, 1, generator=g)), 0.5, randn(n, 1, generator=g))
    assert abs(float(y.mean()) - 2 * math.exp(-0.8)) < 4 * math.sqrt(1 / n)
    assert abs(float(y.var()) - (1 - math.exp(-1.6))) < 4 * math.sqrt(2 / n)
    z = ou_step(randn(n, 1, generator=g), 0.7, randn(n, 1, generator=g))
    assert abs(float(z.mean())) < 4 / math.sqrt(n) and abs(float(z.var()) - 1) < 4 * math.sqrt(2 / n)


@pytest.mark.parametrize("h", [0.0, -0.1, float("nan")])
def test_ou_step_rejects_bad_h(h):
    x = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="h must be > 0"):
        ou_step(x, h, x)


def test_geometric_steps():
    assert geometric_steps(0.025, 1.25, 8) == pytest.approx([0.025 * 1.25**k for k in range(8)], rel=1e-15)
    hs = geometric_steps(0.15, 1.3, 3)
    assert hs[0] == 0.15 and hs[1] / hs[0] == pytest.approx(1.3) and hs[2] / hs[1] == pytest.approx(1.3)
    assert geometric_steps(0.1, 2.0, 0) == []
    for args, match in (((0.1, 1.0, -1), "L must be >= 0"), ((0.0, 1.0, 2), "c > 0"), ((0.1, -1.0, 2), "rho > 0")):
        with pytest.raises(ValueError, match=match):
            geometric_steps(*args)


def test_block_steps_with_and_without_free_block():
    assert block_steps([0.1, 0.2], free_block=True) == [0.1, 0.2, None]
    assert block_steps([0.1, 0.2], free_block=False) == [0.1, 0.2]
    assert block_steps([], free_block=True) == [None]  # L = 0: global flow matching
    assert all(isinstance(h, float) for h in block_steps([1, 2], free_block=False))
    with pytest.raises(ValueError, match="at least one block"):
        block_steps([], free_block=False)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), "0.1", None])
def test_block_steps_rejects_bad_h(bad):
    with pytest.raises(ValueError, match=r"h\[1\]"):
        block_steps([0.1, bad], free_block=True)
