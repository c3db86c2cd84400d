"""Saving and loading flows: the round trip reproduces log-densities and seeded samples exactly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import F64, assert_same_params, make_gen, randn, random_flow, tiny_config, tiny_net

import localfm
from localfm import CheckpointError, LocalFlow, SolverConfig, Standardizer


@pytest.fixture(scope="module")
def fitted():
    x = randn(200, 3, generator=make_gen(0)) * torch.tensor([1.0, 3.0, 0.2], dtype=F64) + 2
    cfg = tiny_config(blocks={"h": [0.1, 0.2], "free_block": True}, train={"steps": 10})
    return localfm.fit(x, cfg), x


def assert_same_behaviour(a: LocalFlow, b: LocalFlow, x: torch.Tensor) -> None:
    assert_same_params(a, b)
    assert a.event_shape == b.event_shape and a.solver == b.solver and a.config == b.config
    assert [blk.h for blk in a] == [blk.h for blk in b]
    assert torch.equal(a.log_prob(x), b.log_prob(x))
    assert torch.equal(a.sample(25, generator=make_gen(3)), b.sample(25, generator=make_gen(3)))


def test_round_trip_of_a_fitted_flow(fitted, tmp_path):
    flow, x = fitted
    folder = localfm.save(flow, tmp_path / "model")
    loaded = localfm.load(folder)
    assert_same_behaviour(flow, loaded, x[:40])
    assert json.loads(json.dumps(flow.training_log)) == loaded.training_log and len(loaded.training_log) == 3
    assert next(loaded.parameters()).dtype == F64
    assert loaded.standardizer.mean.dtype == F64
    assert not loaded.training
    # Loading by the file inside the folder works too, and the bound method saves the same way.
    assert_same_behaviour(flow, localfm.load(folder / "flow.json"), x[:10])
    again = flow.save(tmp_path / "again")
    assert_same_behaviour(flow, localfm.load(again), x[:10])


def test_saving_over_a_checkpoint_replaces_it(fitted, tmp_path):
    flow, x = fitted
    other = localfm.fit(x, tiny_config(blocks={"h": [0.3], "free_block": False}, train={"steps": 5}))
    localfm.save(other, tmp_path / "model")
    localfm.save(flow, tmp_path / "model")
    assert_same_behaviour(flow, localfm.load(tmp_path / "model"), x[:10])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folders left


def test_hand_built_flow_needs_a_net_factory(tmp_path):
    flow = random_flow(d=3, n_blocks=2, seed=4, solver=SolverConfig("rk4", 4))
    localfm.save(flow, tmp_path / "m")
    with pytest.raises(CheckpointError, match="net_factory"):
        localfm.load(tmp_path / "m")
    loaded = localfm.load(tmp_path / "m", net_factory=lambda d, cfg: tiny_net(d, 0))
    assert_same_behaviour(flow, loaded, randn(7, 3, generator=make_gen(5)))


def test_zero_block_flow_round_trip(tmp_path):
    std = Standardizer(torch.tensor([1.0, 2.0], dtype=F64), torch.tensor([3.0, 0.5], dtype=F64))
    flow = LocalFlow((2,), [], std)
    localfm.save(flow, tmp_path / "m")
    loaded = localfm.load(tmp_path / "m", net_factory=lambda d, cfg: None)
    x = randn(6, 2, generator=make_gen(6))
    assert torch.equal(loaded.log_prob(x), flow.log_prob(x))


def test_loading_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no localfm checkpoint"):
        localfm.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError):
        localfm.load(tmp_path / "empty")
