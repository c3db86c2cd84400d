"""The evaluation's solver check: an exact likelihood is only exact once the ODE solves converge."""

from __future__ import annotations

import torch
from conftest import F64, make_gen, randn

from localfm import Block, LocalFlow, SolverConfig, Standardizer
from localfm.nets import MLP, NetConfig
from localfm.runs import solver_check


def flow_with(net_config: NetConfig, solver: SolverConfig, seed: int = 0) -> LocalFlow:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = MLP(2, net_config).double()
        with torch.no_grad():
            net.layers[-1].weight.mul_(8.0)  # a strong field, so that coarse solves are visibly off
    std = Standardizer(torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64))
    return LocalFlow((2,), [Block(net, 0.1)], std, solver).double()


def test_a_rough_field_on_one_rk4_step_is_flagged_and_a_fine_solve_is_not():
    x = randn(300, 2, generator=make_gen(1))
    rough = NetConfig(width=32, depth=2, activation="tanh", x_fourier=16, x_fourier_scale=6.0)
    coarse = solver_check(flow_with(rough, SolverConfig("rk4", 1)), x)
    assert not coarse["converged"] and abs(coarse["difference"]) > 0.02
    assert coarse["solver"] == "rk4 x1" and coarse["finer_solver"] == "rk4 x2"
    fine = solver_check(flow_with(rough, SolverConfig("rk4", 64)), x)
    assert fine["converged"] and abs(fine["difference"]) < 1e-3
    adaptive = solver_check(flow_with(rough, SolverConfig("dopri5", rtol=1e-6, atol=1e-6)), x)
    assert adaptive["converged"] and "rtol 1e-08" in adaptive["finer_solver"]


def test_an_explicit_finer_solver_and_the_standard_error():
    x = randn(300, 2, generator=make_gen(2))
    rough = NetConfig(width=32, depth=2, activation="tanh", x_fourier=16, x_fourier_scale=6.0)
    c = solver_check(flow_with(rough, SolverConfig("rk4", 1)), x, finer=SolverConfig("rk4", 64))
    assert c["finer_solver"] == "rk4 x64" and c["finer_seconds"] > 0
    assert 0 < c["difference_se"] < abs(c["difference"])
    torch.testing.assert_close(torch.tensor(c["difference"]), torch.tensor(c["nll_finer"] - c["nll"]))
