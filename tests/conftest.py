"""Shared fixtures: float64 on CPU, seeded generators, tiny networks and configs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from localfm import FlowConfig
from localfm.config import from_dict
from localfm.flow import Block, LocalFlow, Standardizer
from localfm.nets import MLP, NetConfig
from localfm.ode import SolverConfig

# The tests use tiny tensors: one thread is faster, and much faster on a shared, busy machine.
torch.set_num_threads(1)

TIGHT = SolverConfig("dopri5", rtol=1e-9, atol=1e-9)


F64 = torch.float64


@pytest.fixture(autouse=True)
def _seeded():
    """A fixed global seed; the default dtype stays float32, as for users: tests ask for float64."""
    torch.manual_seed(0)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def make_gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=F64)


def tiny_net(d: int, seed: int, width: int = 16, depth: int = 2, activation: str = "tanh") -> MLP:
    """A small random float64 MLP whose field is far from zero, so every block does something."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = MLP(d, NetConfig(width=width, depth=depth, activation=activation)).double()
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(1.5)
    return net


def random_flow(d: int = 3, n_blocks: int = 2, seed: int = 0, solver: SolverConfig = TIGHT) -> LocalFlow:
    """A randomly initialised flow with a non-trivial standardisation."""
    g = make_gen(seed)
    mean = randn(d, generator=g)
    scale = torch.rand(d, generator=g, dtype=F64) * 2 + 0.3
    hs = [0.1, 0.2, 0.3, None][-n_blocks:] if n_blocks else []
    blocks = [Block(tiny_net(d, seed + 10 + i), h) for i, h in enumerate(hs)]
    return LocalFlow((d,), blocks, Standardizer(mean, scale), solver).double()


def tiny_config(**groups) -> FlowConfig:
    """A float64 config with a tiny network and few steps; ``groups`` update the nested settings."""
    base = {
        "seed": 0,
        "dtype": "float64",
        "net": {"width": 16, "depth": 2, "activation": "tanh"},
        "blocks": {"schedule": "list", "h": [0.2], "free_block": True},
        "train": {
            "steps": 20,
            "batch_size": 64,
            "lr": 1e-2,
            "lr_schedule": "constant",
            "log_every": 5,
            "push_batch_size": 1024,
        },
        "solver": {"method": "rk4", "steps": 4},
    }
    data = copy.deepcopy(base)
    for key, value in groups.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return from_dict(FlowConfig, data)


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"parameter {k} differs"


@pytest.fixture
def gaussian_data():
    """A 2-D correlated Gaussian (mean, covariance) and train/test draws from it."""
    g = make_gen(7)
    mean = torch.tensor([1.0, -2.0], dtype=F64)
    cov = torch.tensor([[2.0, 1.2], [1.2, 1.0]], dtype=F64)
    chol = torch.linalg.cholesky(cov)
    x = randn(6000, 2, generator=g) @ chol.T + mean
    return mean, cov, x[:4000], x[4000:]
