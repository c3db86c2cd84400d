"""Sample metrics: energy distance and Gaussian-kernel MMD against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import F64, make_gen, randn

from localfm.metrics import _mean_pairwise, energy_distance, mmd, nll_summary


def energy_distance_1d_shift(mu: float) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| for X ~ N(0, 1), Y ~ N(mu, 1)."""
    s = math.sqrt(2.0)  # X - Y ~ N(-mu, 2); E|N(m, s^2)| = s sqrt(2/pi) e^{-m^2/2s^2} + m (1 - 2 Phi(-m/s))
    e_xy = s * math.sqrt(2 / math.pi) * math.exp(-(mu**2) / 4) + mu * math.erf(mu / (s * math.sqrt(2)))
    return 2 * e_xy - 2 * (2 / math.sqrt(math.pi))


def mmd_1d_shift(mu: float, bw: float) -> float:
    """Squared MMD with kernel exp(-r^2 / 2 bw^2) between N(0, 1) and N(mu, 1)."""
    a = bw / math.sqrt(bw**2 + 2)
    return 2 * a * (1 - math.exp(-(mu**2) / (2 * (bw**2 + 2))))


def test_energy_distance_closed_form_and_sign():
    g = make_gen(0)
    n = 3000
    x = randn(n, 1, generator=g)
    same = energy_distance(x, randn(n, 1, generator=g))
    shifted = energy_distance(x, randn(n, 1, generator=g) + 0.5)
    assert abs(same) < 0.01
    assert shifted == pytest.approx(energy_distance_1d_shift(0.5), abs=0.02)
    assert shifted > 10 * abs(same)
    # Point masses: only the cross term remains, 2 |a - b|.
    a, b = torch.zeros(5, 2, dtype=F64), torch.tensor([[3.0, 4.0]], dtype=F64).expand(7, 2)
    assert energy_distance(a, b) == pytest.approx(10.0, abs=1e-6)


def test_mmd_closed_form_and_sign():
    g = make_gen(1)
    n = 2000
    x = randn(n, 1, generator=g)
    same = mmd(x, randn(n, 1, generator=g), bandwidth=1.0)
    shifted = mmd(x, randn(n, 1, generator=g) + 0.5, bandwidth=1.0)
    assert abs(same) < 0.003
    assert shifted == pytest.approx(mmd_1d_shift(0.5, 1.0), abs=0.006)
    assert shifted > 10 * abs(same)
    assert mmd(x[:500], x[500:1000] + 0.5) > 0  # median-distance bandwidth by default


@pytest.mark.parametrize("metric", [energy_distance, lambda x, y: mmd(x, y, bandwidth=1.0)])
def test_metrics_are_unbiased_for_the_same_law(metric):
    """U-statistics: averaged over many small same-law pairs they are 0 within 3 standard errors."""
    g = make_gen(2)
    vals = torch.tensor([metric(randn(20, 2, generator=g), randn(30, 2, generator=g)) for _ in range(400)])
    assert abs(float(vals.mean())) < 3 * float(vals.std()) / math.sqrt(len(vals))


def test_blocks_do_not_change_the_mean():
    g = make_gen(3)
    a, b = randn(37, 3, generator=g), randn(23, 3, generator=g)
    for excl, bb in ((False, b), (True, a)):
        whole = _mean_pairwise(a, bb, lambda d: d, exclude_diagonal=excl)
        blocked = _mean_pairwise(a, bb, lambda d: d, block=8, exclude_diagonal=excl)
        assert blocked == pytest.approx(whole, rel=1e-9)
    brute = float(torch.cdist(a, a).sum()) / (37 * 36)
    assert _mean_pairwise(a, a, lambda d: d, block=5, exclude_diagonal=True) == pytest.approx(brute, rel=1e-9)


def test_image_shaped_points_are_flattened():
    g = make_gen(4)
    x, y = randn(10, 1, 2, 2, generator=g), randn(12, 1, 2, 2, generator=g)
    assert energy_distance(x, y) == pytest.approx(energy_distance(x.flatten(1), y.flatten(1)))


def test_bad_inputs_raise():
    x = torch.zeros(5, 2, dtype=F64)
    with pytest.raises(ValueError, match="same dimension"):
        energy_distance(x, torch.zeros(5, 3, dtype=F64))
    with pytest.raises(ValueError, match="same dimension"):
        mmd(x, torch.zeros(5, 3, dtype=F64))
    with pytest.raises(ValueError, match="x must hold at least 2 points"):
        energy_distance(torch.zeros(1, 2, dtype=F64), x)
    with pytest.raises(ValueError, match="y must hold at least 2 points"):
        mmd(x, torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match="bandwidth"):
        mmd(x, x + 1, bandwidth=0.0)


def test_nll_summary():
    lp = torch.tensor([-1.0, -2.0, -3.0, -4.0], dtype=F64)
    s = nll_summary(lp)
    assert s["nll"] == pytest.approx(2.5) and s["n"] == 4
    assert s["nll_se"] == pytest.approx(float(lp.std()) / 2)
