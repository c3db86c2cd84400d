"""ODE integration: order of convergence, tolerances, direction, divergence estimators."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import F64, make_gen, randn, tiny_net

from localfm.ode import SolverConfig, divergence_exact, divergence_hutchinson, integrate

A = torch.tensor([[-0.5, 2.0, 0.3], [-2.0, -0.5, 0.0], [0.1, 0.4, 0.7]], dtype=F64)


def linear(y, t):
    return y @ A.T


def exact_linear(x0, t=1.0):
    return x0 @ torch.linalg.matrix_exp(t * A).T


def observed_order(method: str, steps: list[int]) -> float:
    x0 = randn(4, 3, generator=make_gen(0))
    exact = exact_linear(x0)
    errs = [
        float((integrate(linear, x0, t0=0.0, t1=1.0, solver=SolverConfig(method, n)).x - exact).abs().max())
        for n in steps
    ]
    return -np.polyfit(np.log(steps), np.log(errs), 1)[0]


@pytest.mark.parametrize(
    ("method", "order", "steps"),
    [("euler", 1, [32, 64, 128, 256]), ("midpoint", 2, [16, 32, 64, 128]), ("rk4", 4, [4, 8, 16, 32])],
)
def test_order_of_convergence(method, order, steps):
    """Error at t = 1 against the matrix exponential falls like steps^-order."""
    assert observed_order(method, steps) == pytest.approx(order, abs=0.15)


@pytest.mark.parametrize(("method", "steps", "nfe"), [("euler", 7, 7), ("midpoint", 5, 10), ("rk4", 3, 12)])
def test_fixed_step_counts(method, steps, nfe):
    x0 = randn(2, 3, generator=make_gen(1))
    assert integrate(linear, x0, t0=0.0, t1=1.0, solver=SolverConfig(method, steps)).nfe == nfe
    assert integrate(linear, x0, t0=1.0, t1=0.0, solver=SolverConfig(method, steps)).nfe == nfe


def sharp_start(y, t):
    """dx/dt = 1 / (2 sqrt(t + 1e-3)): x(t) = x(0) + sqrt(t + 1e-3) - sqrt(1e-3), steep at t = 0."""
    return torch.ones_like(y) / (2 * torch.sqrt(t + 1e-3))


def test_a_grid_crowded_at_the_data_side_solves_a_field_steep_there():
    x0 = torch.zeros(3, 2, dtype=F64)
    exact = math.sqrt(1 + 1e-3) - math.sqrt(1e-3)
    err, back = {}, {}
    for power in (1.0, 2.0, 3.0):
        solver = SolverConfig("rk4", 8, grid_power=power)
        fwd = integrate(sharp_start, x0, t0=0.0, t1=1.0, solver=solver)
        bwd = integrate(sharp_start, x0 + exact, t0=1.0, t1=0.0, solver=solver)  # the same grid, reversed
        assert fwd.nfe == bwd.nfe == 32
        err[power], back[power] = float((fwd.x - exact).abs().max()), float(bwd.x.abs().max())
    assert err[3.0] < err[2.0] < 0.1 * err[1.0]
    assert back[3.0] < back[2.0] < 0.1 * back[1.0]
    # on a smooth field it still converges at fourth order (at a larger constant: longer last steps)
    x0 = randn(4, 3, generator=make_gen(9))
    e32, e64 = (
        float(
            (integrate(field, x0, t0=0.0, t1=1.0, solver=SolverConfig("rk4", n, grid_power=2.0)).x - exact_linear(x0))
            .abs()
            .max()
        )
        for n in (32, 64)
    )
    assert e32 < 1e-4 and e64 < e32 / 12


@pytest.mark.parametrize("tol", [1e-6, 1e-9])
def test_dopri5_meets_its_tolerance(tol):
    x0 = randn(4, 3, generator=make_gen(2))
    sol = integrate(linear, x0, t0=0.0, t1=1.0, solver=SolverConfig("dopri5", rtol=tol, atol=tol))
    assert float((sol.x - exact_linear(x0)).abs().max()) < 50 * tol


@pytest.mark.parametrize("divergence", [None, "exact"])
def test_tolerance_holds_per_point_whatever_the_batch(divergence):
    """A point's adaptive solve is as accurate in a large batch of easy points as when solved alone.

    One point turns 120 times faster than 3,999 others. With ``error_norm="batch"`` (one RMS over the
    batch) its error is about 100 times the one it gets alone; the default ``"point"`` holds it there.
    """
    n = 4000
    speed = torch.full((n, 1), 0.5, dtype=F64)
    speed[0] = 60.0
    x0 = randn(n, 2, generator=make_gen(11))

    def spin(k):
        return lambda y, t: k * torch.stack([-y[:, 1], y[:, 0]], 1) - 0.3 * y * torch.sin(k * t)

    def error(k, x, **kw):
        sol = integrate(
            spin(k), x, t0=0.0, t1=1.0, solver=SolverConfig("dopri5", rtol=1e-6, atol=1e-6, **kw), divergence=divergence
        )
        return float((sol.x[0] - ref.x[0]).norm())

    ref = integrate(spin(speed[:1]), x0[:1], t0=0.0, t1=1.0, solver=SolverConfig("rk4", 4000), divergence=divergence)
    alone = error(speed[:1], x0[:1])
    assert alone < 1e-3
    assert error(speed, x0) < 2 * alone
    assert error(speed, x0, error_norm="batch") > 20 * alone


def test_logdet_control_holds_the_tolerance_on_the_log_determinant():
    """``a(t) x`` near ``x = 0``: the state is within tolerance whatever the steps, its log-determinant
    ``d * integral a dt`` is not. Controlling the state alone gets it 0.45 nats wrong; with
    ``logdet_control`` the tolerance holds for it too, at more evaluations."""
    x0 = torch.full((4, 3), 1e-7, dtype=F64)

    def vel(y, t):
        return 3 * torch.sin(20 * t) * y

    exact = 3 * 3 * (1 - math.cos(20.0)) / 20  # d * integral_0^1 3 sin(20 t) dt

    def solve(**kw):
        return integrate(
            vel, x0, t0=0.0, t1=1.0, solver=SolverConfig("dopri5", rtol=1e-6, atol=1e-6, **kw), divergence="exact"
        )

    state_only, controlled = solve(), solve(logdet_control=True)
    assert float((state_only.delta - exact).abs().max()) > 0.1
    assert float((controlled.delta - exact).abs().max()) < 1e-4
    assert controlled.nfe > state_only.nfe
    # sampling (no divergence) is unchanged by the option
    plain = integrate(vel, x0, t0=0.0, t1=1.0, solver=SolverConfig("dopri5", rtol=1e-6, atol=1e-6, logdet_control=True))
    assert plain.nfe == integrate(vel, x0, t0=0.0, t1=1.0, solver=SolverConfig("dopri5", rtol=1e-6, atol=1e-6)).nfe


def field(y, t):
    """A non-autonomous field: dx/dt = 2 t A x, solved by x(t) = expm(t^2 A) x(0)."""
    return 2 * t * (y @ A.T)


@pytest.mark.parametrize("solver", [SolverConfig("rk4", 64), SolverConfig("dopri5", rtol=1e-10, atol=1e-10)])
def test_backward_integration_inverts_forward(solver):
    """t0 = 1, t1 = 0 solves the same ODE backwards: from the exact end point it returns the start."""
    x0 = randn(5, 3, generator=make_gen(3))
    x1 = exact_linear(x0)
    fwd = integrate(field, x0, t0=0.0, t1=1.0, solver=solver)
    bwd = integrate(field, x1, t0=1.0, t1=0.0, solver=solver)
    round_trip = integrate(field, fwd.x, t0=1.0, t1=0.0, solver=solver)
    torch.testing.assert_close(fwd.x, x1, rtol=0, atol=1e-6)
    torch.testing.assert_close(bwd.x, x0, rtol=0, atol=1e-6)
    torch.testing.assert_close(round_trip.x, x0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("solver", [SolverConfig("rk4", 64), SolverConfig("dopri5", rtol=1e-9, atol=1e-9)])
@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_joint_divergence_of_a_linear_field(solver, divergence):
    """For v = 2 t A x the integrated divergence over [0, 1] is tr(A), and -tr(A) backwards.

    Hutchinson with one Rademacher probe is exact for a diagonal A only, so the probe test uses
    the diagonal part.
    """
    x0 = randn(3, 3, generator=make_gen(4))
    M = A if divergence == "exact" else torch.diag(torch.diagonal(A))
    probe = torch.randint(0, 2, x0.shape, generator=make_gen(5)).to(F64) * 2 - 1 if divergence == "hutchinson" else None

    def f(y, t):
        return 2 * t * (y @ M.T)

    fwd = integrate(f, x0, t0=0.0, t1=1.0, solver=solver, divergence=divergence, probe=probe)
    bwd = integrate(f, fwd.x, t0=1.0, t1=0.0, solver=solver, divergence=divergence, probe=probe)
    tr = float(torch.trace(M))
    torch.testing.assert_close(fwd.delta, torch.full((3,), tr, dtype=F64), rtol=0, atol=1e-8)
    torch.testing.assert_close(bwd.delta, torch.full((3,), -tr, dtype=F64), rtol=0, atol=1e-8)
    torch.testing.assert_close(fwd.x, x0 @ torch.linalg.matrix_exp(M).T, rtol=0, atol=1e-6)


def test_adaptive_steps_do_not_depend_on_the_divergence():
    """Step control runs on the state alone: the joint solve takes the same steps as the plain one."""
    net = tiny_net(3, 0)
    x0 = randn(6, 3, generator=make_gen(6))
    solver = SolverConfig("dopri5", rtol=1e-6, atol=1e-6)
    plain = integrate(net, x0, t0=0.0, t1=1.0, solver=solver)
    joint = integrate(net, x0, t0=0.0, t1=1.0, solver=solver, divergence="exact")
    assert plain.nfe == joint.nfe
    torch.testing.assert_close(plain.x, joint.x, rtol=0, atol=1e-12)


def jacobian_trace(f, x):
    return torch.stack([torch.trace(torch.autograd.functional.jacobian(lambda y: f(y[None])[0], xb)) for xb in x])


@pytest.mark.parametrize("batched", [True, False, None])
def test_exact_divergence_is_the_jacobian_trace(batched):
    net = tiny_net(5, 1)
    x = randn(7, 5, generator=make_gen(7))
    t = torch.tensor(0.3, dtype=F64)

    def f(y):
        return net(y, t)

    v, div = divergence_exact(f, x, batched=batched)
    torch.testing.assert_close(v, f(x).detach(), rtol=0, atol=1e-14)
    torch.testing.assert_close(div, jacobian_trace(f, x), rtol=1e-12, atol=1e-12)
    assert not div.requires_grad and not v.requires_grad


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(kind):
    """The mean over many probes is within three standard errors of the exact trace, per point."""
    net = tiny_net(4, 2)
    t = torch.tensor(0.6, dtype=F64)

    def f(y):
        return net(y, t)

    x = randn(3, 4, generator=make_gen(8))
    M = 4000
    g = make_gen(9)
    if kind == "rademacher":
        probe = torch.randint(0, 2, (M * 3, 4), generator=g).to(F64) * 2 - 1
    else:
        probe = randn(M * 3, 4, generator=g)
    _, est = divergence_hutchinson(f, x.repeat(M, 1), probe)
    est = est.reshape(M, 3)
    se = est.std(0) / math.sqrt(M)
    _, exact = divergence_exact(f, x)
    assert ((est.mean(0) - exact).abs() < 3 * se).all(), (est.mean(0), exact, se)
    assert (se > 0).all()


def test_hutchinson_matches_the_quadratic_form():
    net = tiny_net(4, 3)
    t = torch.tensor(0.2, dtype=F64)
    x = randn(2, 4, generator=make_gen(10))
    probe = randn(2, 4, generator=make_gen(11))
    _, est = divergence_hutchinson(lambda y: net(y, t), x, probe)
    for b in range(2):
        J = torch.autograd.functional.jacobian(lambda y: net(y[None], t)[0], x[b])
        torch.testing.assert_close(est[b], probe[b] @ J @ probe[b], rtol=1e-12, atol=1e-12)


def test_integrate_rejects_bad_arguments():
    x = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="divergence"):
        integrate(linear, x, t0=0.0, t1=1.0, divergence="trace")
    with pytest.raises(ValueError, match="probe"):
        integrate(linear, x, t0=0.0, t1=1.0, divergence="hutchinson")
    with pytest.raises(ValueError, match="probe"):
        integrate(linear, x, t0=0.0, t1=1.0, divergence="hutchinson", probe=torch.ones(2, 4, dtype=F64))
    with pytest.raises(ValueError, match=r"shape \(B, d\)"):
        integrate(lambda y, t: y, torch.zeros(2, 1, 2, 2, dtype=F64), t0=0.0, t1=1.0, divergence="exact")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "rk45"}, "solver.method"),
        ({"method": "rk4", "steps": 0}, "solver.steps"),
        ({"method": "rk4", "steps": 2.0}, "solver.steps"),
        ({"rtol": 0.0}, "solver.rtol"),
        ({"atol": -1e-3}, "solver.atol"),
        ({"method": "rk4", "grid_power": 0.5}, "solver.grid_power"),
        ({"method": "rk4", "grid_power": float("nan")}, "solver.grid_power"),
        ({"method": "rk4", "grid_power": []}, "solver.grid_power"),
        ({"method": "rk4", "grid_power": [3, 0.5]}, "solver.grid_power"),
        ({"method": "rk4", "grid_power": True}, "solver.grid_power"),
        ({"error_norm": "max"}, "solver.error_norm"),
        ({"logdet_control": "yes"}, "solver.logdet_control"),
    ],
)
def test_solver_config_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SolverConfig(**kwargs)


@pytest.mark.parametrize("field_kind", ["no-parameters", "parameter-only"])
@pytest.mark.parametrize("divergence", ["exact", "exact-batched", "hutchinson"])
def test_fields_that_ignore_x_have_zero_divergence(field_kind, divergence):
    c = torch.tensor([0.5, -1.0], dtype=F64, requires_grad=field_kind == "parameter-only")

    def f(y):
        return (c * 1.0).expand_as(y)

    x = randn(3, 2, generator=make_gen(12))
    if divergence == "hutchinson":
        v, div = divergence_hutchinson(f, x, torch.ones_like(x))
    else:
        v, div = divergence_exact(f, x, batched=divergence == "exact-batched")
    assert torch.equal(div, torch.zeros(3, dtype=F64))
    torch.testing.assert_close(v, c.detach().expand(3, 2))
