"""The chain of blocks: direction convention, invertibility, log-determinant, closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import F64, TIGHT, make_gen, randn, random_flow
from torch import nn
from torchdiffeq import odeint

from localfm import Block, LocalFlow, SolverConfig, Standardizer

RK4 = SolverConfig("rk4", steps=8)


class ConstantField(nn.Module):
    def __init__(self, c: torch.Tensor) -> None:
        super().__init__()
        self.c = nn.Parameter(c.clone())

    def forward(self, x, t):
        return self.c.expand_as(x)


class LinearField(nn.Module):
    def __init__(self, M: torch.Tensor) -> None:
        super().__init__()
        self.M = nn.Parameter(M.clone())

    def forward(self, x, t):
        return x @ self.M.T


def gaussian_log_density(x, mean, scale):
    return torch.distributions.Normal(mean, scale).log_prob(x).sum(-1)


def test_direction_convention():
    """forward (encode) = data to noise along +v over t: 0 -> 1; decode goes back along -v."""
    c = torch.tensor([1.0, -2.0], dtype=F64)
    mean, scale = torch.tensor([3.0, 0.5], dtype=F64), torch.tensor([2.0, 0.25], dtype=F64)
    flow = LocalFlow((2,), [Block(ConstantField(c), 0.1)], Standardizer(mean, scale), RK4)
    x = randn(5, 2, generator=make_gen(0))
    enc = flow.encode(x, with_log_prob=True)
    torch.testing.assert_close(enc.x, (x - mean) / scale + c, rtol=0, atol=1e-13)
    # Constant velocity has zero divergence: log p(x) = log q(u + c) - sum log scale.
    expected = gaussian_log_density(enc.x, torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64)) - scale.log().sum()
    torch.testing.assert_close(enc.log_prob, expected, rtol=0, atol=1e-12)
    z = randn(5, 2, generator=make_gen(1))
    torch.testing.assert_close(flow.decode(z).x, (z - c) * scale + mean, rtol=0, atol=1e-13)
    # sample = decode of N(0, I) draws from the same generator.
    torch.testing.assert_close(flow.sample(5, generator=make_gen(1)), (z - c) * scale + mean, rtol=0, atol=1e-13)


def test_linear_fields_closed_form():
    """Blocks v_n = A_n x: encode is expm(A_2) expm(A_1) u and log p adds tr(A_1) + tr(A_2)."""
    g = make_gen(2)
    A1, A2 = 0.5 * randn(3, 3, generator=g), 0.5 * randn(3, 3, generator=g)
    mean, scale = randn(3, generator=g), torch.tensor([0.5, 1.0, 3.0], dtype=F64)
    blocks = [Block(LinearField(A1), 0.1), Block(LinearField(A2), None)]
    flow = LocalFlow((3,), blocks, Standardizer(mean, scale), TIGHT)
    x = randn(6, 3, generator=g)
    z = (x - mean) / scale @ torch.linalg.matrix_exp(A1).T @ torch.linalg.matrix_exp(A2).T
    enc = flow.encode(x, with_log_prob=True)
    torch.testing.assert_close(enc.x, z, rtol=0, atol=1e-7)
    unit = gaussian_log_density(z, torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64))
    expected = unit + torch.trace(A1) + torch.trace(A2) - scale.log().sum()
    torch.testing.assert_close(enc.log_prob, expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(flow.log_prob(x), expected, rtol=0, atol=1e-7)
    # The inverse direction reports the same density of its end points.
    dec = flow.decode(z, with_log_prob=True)
    torch.testing.assert_close(dec.x, x, rtol=0, atol=1e-7)
    torch.testing.assert_close(dec.log_prob, expected, rtol=0, atol=1e-7)


def test_decode_inverts_encode():
    flow = random_flow(d=3, n_blocks=3, seed=1)
    x = randn(16, 3, generator=make_gen(3)) * 2 + 1
    enc = flow.encode(x)
    assert (enc.x - flow.standardizer(x)).abs().max() > 0.1  # the blocks move the points
    torch.testing.assert_close(flow.decode(enc.x).x, x, rtol=0, atol=1e-6)
    z = randn(16, 3, generator=make_gen(4))
    torch.testing.assert_close(flow.encode(flow.decode(z).x).x, z, rtol=0, atol=1e-6)
    assert len(enc.nfe) == 3 and all(n > 0 for n in enc.nfe)


def encode_map(flow: LocalFlow, x: torch.Tensor) -> torch.Tensor:
    """The encode map of one point, rebuilt with differentiable torchdiffeq solves."""
    y = flow.standardizer(x)[None]
    times = torch.tensor([0.0, 1.0], dtype=F64)
    for block in flow.blocks:
        y = odeint(lambda t, s, net=block.net: net(s, t), y, times, method="dopri5", rtol=1e-10, atol=1e-10)[-1]
    return y[0]


def test_log_prob_is_base_plus_log_det_of_the_autograd_jacobian():
    """log p(x) - log q(z) = log |det d encode / dx|, standardisation included."""
    flow = random_flow(d=3, n_blocks=2, seed=2)
    x = randn(4, 3, generator=make_gen(5)) + 0.5
    enc = flow.encode(x, with_log_prob=True)
    base = gaussian_log_density(enc.x, torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64))
    for b in range(x.shape[0]):
        torch.testing.assert_close(encode_map(flow, x[b]).detach(), enc.x[b], rtol=0, atol=1e-7)
        J = torch.autograd.functional.jacobian(lambda p: encode_map(flow, p), x[b])
        sign, logabsdet = torch.linalg.slogdet(J)
        assert sign > 0  # a flow map preserves orientation
        assert abs(float(logabsdet) + float(flow.standardizer.scale.log().sum())) > 0.05  # blocks add log-det
        torch.testing.assert_close(enc.log_prob[b] - base[b], logabsdet, rtol=0, atol=1e-6)


def test_sample_and_log_prob_agree_with_log_prob():
    flow = random_flow(d=2, n_blocks=2, seed=3)
    x, lp = flow.sample_and_log_prob(32, generator=make_gen(6))
    torch.testing.assert_close(flow.log_prob(x), lp, rtol=0, atol=1e-6)


def test_zero_blocks_is_the_standardised_gaussian():
    mean, scale = torch.tensor([1.0, -3.0, 0.2], dtype=F64), torch.tensor([0.1, 2.0, 5.0], dtype=F64)
    flow = LocalFlow((3,), [], Standardizer(mean, scale))
    x = randn(10, 3, generator=make_gen(7)) * scale + mean
    lp = flow.log_prob(x)
    assert lp.dtype == F64
    torch.testing.assert_close(lp, gaussian_log_density(x, mean, scale), rtol=1e-13, atol=1e-13)
    z = randn(10, 3, generator=make_gen(8))
    torch.testing.assert_close(flow.sample(10, generator=make_gen(8)), z * scale + mean, rtol=1e-13, atol=1e-13)


def test_hutchinson_log_prob_is_unbiased():
    flow = random_flow(d=3, n_blocks=2, seed=4, solver=RK4)
    x = randn(2, 3, generator=make_gen(9))
    exact = flow.log_prob(x, divergence="exact")
    M = 400
    est = flow.log_prob(x.repeat(M, 1), divergence="hutchinson", generator=make_gen(10)).reshape(M, 2)
    se = est.std(0) / math.sqrt(M)
    assert (se > 0).all()
    assert ((est.mean(0) - exact).abs() < 3 * se).all(), (est.mean(0), exact, se)
    again = flow.log_prob(x.repeat(M, 1), divergence="hutchinson", generator=make_gen(10)).reshape(M, 2)
    assert torch.equal(est, again)


def test_batching_does_not_change_results():
    flow = random_flow(d=2, n_blocks=2, seed=5, solver=RK4)
    x = randn(23, 2, generator=make_gen(11))
    torch.testing.assert_close(flow.log_prob(x, batch_size=5), flow.log_prob(x, batch_size=100), rtol=0, atol=1e-12)
    a = flow.sample(23, generator=make_gen(12), batch_size=4)
    b = flow.sample(23, generator=make_gen(12))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.equal(b, flow.sample(23, generator=make_gen(12)))
    assert not torch.equal(b, flow.sample(23, generator=make_gen(13)))


def test_slices_compose():
    """flow[:1] then flow[1:] is flow; log-densities add up along the chain."""
    flow = random_flow(d=2, n_blocks=2, seed=6)
    x = randn(8, 2, generator=make_gen(14))
    head, tail = flow[:1], flow[1:]
    assert len(head) == 1 and len(tail) == 1 and tail[0] is flow[1]
    y = head.encode(x).x
    torch.testing.assert_close(tail.encode(y).x, flow.encode(x).x, rtol=0, atol=1e-7)
    base_y = gaussian_log_density(y, torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64))
    torch.testing.assert_close(flow.log_prob(x), head.log_prob(x) - base_y + tail.log_prob(y), rtol=0, atol=1e-7)


def test_per_block_grids_apply_block_by_block():
    """solver.grid_power (3, 1): block 0 on a t^3 grid, the later blocks on equal steps, in both
    directions, for the whole flow and for its slices; a scalar grid would give other numbers."""
    flow = random_flow(d=2, n_blocks=3, seed=8, solver=SolverConfig("rk4", 2, grid_power=[3, 1]))
    assert flow.solver.grid_power == (3, 1)
    x = randn(6, 2, generator=make_gen(16))
    u, z = flow.standardizer(x), x
    for n in range(3):
        u = flow[n].forward(u, solver=SolverConfig("rk4", 2, grid_power=3 if n == 0 else 1)).x
    torch.testing.assert_close(flow.encode(x).x, u, rtol=0, atol=1e-12)
    assert (flow.encode(x, solver=SolverConfig("rk4", 2, grid_power=3)).x - u).abs().max() > 1e-6
    z = u
    for n in reversed(range(3)):
        z = flow[n].inverse(z, solver=SolverConfig("rk4", 2, grid_power=3 if n == 0 else 1)).x
    torch.testing.assert_close(flow.decode(u).x, flow.standardizer.inverse(z), rtol=0, atol=1e-12)
    tail = flow[1:]
    assert tail.solver.grid_power == (1, 1)
    torch.testing.assert_close(tail.encode(flow[:1].encode(x).x).x, u, rtol=0, atol=1e-12)


def test_return_path_endpoints():
    flow = random_flow(d=2, n_blocks=3, seed=7, solver=RK4)
    x = randn(4, 2, generator=make_gen(15))
    enc = flow.encode(x, return_path=True)
    assert len(enc.path) == 4 and torch.equal(enc.path[-1], enc.x)
    dec = flow.decode(enc.x, return_path=True)
    # Paths stay in the standardised coordinates where the blocks act; dec.x is in data units.
    assert len(dec.path) == 4 and torch.equal(dec.path[0], enc.x)
    assert torch.allclose(flow.standardizer.inverse(dec.path[-1]), dec.x)
    assert torch.allclose(dec.path[-1], enc.path[0], atol=1e-3)


def test_bad_inputs_raise():
    flow = random_flow(d=3, n_blocks=1, seed=8, solver=RK4)
    with pytest.raises(ValueError, match=r"x has points of shape \(2,\).*\(3,\)"):
        flow.log_prob(torch.zeros(4, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"x must have shape"):
        flow.log_prob(torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="x is empty"):
        flow.log_prob(torch.zeros(0, 3, dtype=F64))
    bad = torch.zeros(4, 3, dtype=F64)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"x has a non-finite value nan at index \(2, 1\)"):
        flow.log_prob(bad)
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        flow.encode(bad)
    with pytest.raises(ValueError, match="z has points"):
        flow.decode(torch.zeros(4, 5, dtype=F64))
    with pytest.raises(TypeError, match="x must"):
        flow.log_prob([["a", "b", "c"]])
    with pytest.raises(TypeError, match="x must hold real numbers"):
        flow.log_prob(torch.zeros(2, 3, dtype=torch.complex128))
    with pytest.raises(ValueError, match="divergence"):
        flow.log_prob(torch.zeros(2, 3, dtype=F64), divergence="trace")
    for n in (0, -1):
        with pytest.raises(ValueError, match="n must be a positive integer"):
            flow.sample(n)
    for n in (2.0, True, "3", None):
        with pytest.raises(TypeError, match="n must be a positive integer"):
            flow.sample(n)
    assert flow.sample(np.int64(3)).shape == (3, 3)
    with pytest.raises(ValueError, match="scale"):
        Standardizer(torch.zeros(2, dtype=F64), torch.tensor([1.0, 0.0], dtype=F64))


def test_standardizer_fit_and_log_det():
    g = make_gen(16)
    x = randn(500, 3, generator=g) * torch.tensor([2.0, 0.5, 1.0], dtype=F64) + 4
    x[:, 2] = 7.0  # a constant coordinate keeps scale 1
    std = Standardizer.fit(x)
    u = std(x)
    torch.testing.assert_close(u[:, :2].mean(0), torch.zeros(2, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(u[:, :2].std(0), torch.ones(2, dtype=F64), rtol=0, atol=1e-12)
    assert float(std.scale[2]) == 1.0
    torch.testing.assert_close(std.inverse(u), x, rtol=0, atol=1e-12)
    J = torch.autograd.functional.jacobian(lambda p: std(p[None])[0], x[0])
    assert std.logdet() == pytest.approx(float(torch.linalg.slogdet(J).logabsdet), abs=1e-12)
