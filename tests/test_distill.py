"""Distillation: students reproduce their teacher's map, count their evaluations, and round-trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from localfm import LocalFlow, Standardizer
from localfm.config import BlocksConfig, FlowConfig
from localfm.distill import (
    DistillConfig,
    DistilledFlow,
    NoLikelihoodError,
    Student,
    distill,
    distill_run,
    is_distilled,
    load_distilled,
    teacher_pairs,
)
from localfm.flow import Block
from localfm.nets import MLP, NetConfig
from localfm.ode import SolverConfig

NET = NetConfig(width=16, depth=2, activation="tanh")
SOLVER = SolverConfig("rk4", steps=4)


def tiny_flow(n_blocks: int = 3, seed: int = 0) -> LocalFlow:
    """A float64 chain of small random MLP blocks: a smooth invertible teacher map, no training needed."""
    torch.manual_seed(seed)
    blocks = []
    for n in range(n_blocks):
        net = MLP(2, NET).double()
        with torch.no_grad():
            net.layers[-1].weight.mul_(0.5)  # displacements of order 0.1-0.5 per block
        blocks.append(Block(net, 0.1 if n < n_blocks - 1 else None))
    cfg = FlowConfig(dtype="float64", net=NET, blocks=BlocksConfig(L=n_blocks - 1), solver=SOLVER)
    std = Standardizer(torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([2.0, 0.5], dtype=torch.float64))
    return LocalFlow((2,), blocks, std, SOLVER, cfg).eval()


def data(n: int = 4000, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor([2.0, 0.5]) + torch.tensor([1.0, -2.0])


FAST = DistillConfig(train_steps=400, batch_size=256, lr=3e-3, generation_pairs=4000, data_pairs=4000, val_pairs=512)


def relative_map_error(teacher: LocalFlow, student: DistilledFlow, n: int = 2000) -> float:
    """rms(student(z) - teacher(z)) / rms(teacher(z) - z), on the same noise, in data units."""
    x_t = teacher.sample(n, generator=torch.Generator().manual_seed(7))
    x_s = student.sample(n, generator=torch.Generator().manual_seed(7))
    z = teacher.standardizer.inverse(torch.randn(n, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    return float((x_s - x_t).pow(2).mean().sqrt() / (x_t - z).pow(2).mean().sqrt())


def test_student_is_the_teachers_euler_scheme_at_init():
    flow = tiny_flow()
    student = Student(flow.blocks[0].net, 3, 0, 0)
    x = torch.randn(64, 2, dtype=torch.float64)
    euler = flow.blocks[0].inverse(x, solver=SolverConfig("euler", steps=3)).x
    torch.testing.assert_close(student(x), euler)


@pytest.mark.parametrize("chained", [True, False])
def test_student_reproduces_teacher_map(chained):
    flow = tiny_flow()
    cfg = FAST.replace(init="teacher", chained=chained, train_steps=250)
    untrained = distill(flow, cfg.replace(train_steps=1, lr=1e-9), x_train=data())
    trained = distill(flow, cfg, x_train=data())
    before, after = relative_map_error(flow, untrained), relative_map_error(flow, trained)
    assert after < 0.02, (before, after)
    assert after < before / 3, (before, after)
    for entry in trained.log[:-1]:
        assert entry["val_relative_error"] < 0.03


def test_identity_init_starts_at_the_identity_and_learns():
    flow = tiny_flow(n_blocks=2)
    start = distill(flow, FAST.replace(train_steps=1, lr=1e-12), x_train=data())
    z = torch.randn(50, 2, dtype=torch.float64)
    torch.testing.assert_close(start.decode(z).x, flow.standardizer.inverse(z))
    trained = distill(flow, FAST.replace(train_steps=400), x_train=data())
    assert relative_map_error(flow, trained) < 0.1


def test_student_from_random_init_learns_the_map():
    flow = tiny_flow(n_blocks=1)
    cfg = FAST.replace(init="fresh", train_steps=300, generation_fraction=1.0)
    assert relative_map_error(flow, distill(flow, cfg)) < 0.1


def test_a_wider_merged_student_has_the_width_asked_for_and_round_trips(tmp_path):
    """``width`` builds fresh students of that width (here one for the whole chain, as wide as a
    global model's network would be); the saved model rebuilds them at that width."""
    from localfm.nets import build_net, count_parameters

    flow = tiny_flow(n_blocks=3)
    cfg = FAST.replace(init="fresh", width=40, group_size=3, train_steps=300, generation_fraction=1.0)
    model = distill(flow, cfg)
    assert len(model) == 1 and model.nfe == 1
    (student,) = model.students
    assert count_parameters(student.net) == count_parameters(build_net(2, NetConfig(width=40, depth=2)))
    assert count_parameters(student.net) > 2 * count_parameters(flow.blocks[0].net)
    assert relative_map_error(flow, model) < 0.2
    back = load_distilled(model.save(tmp_path / "wide"))
    g = torch.Generator().manual_seed(4)
    assert torch.equal(back.sample(50, generator=g), model.sample(50, generator=g.manual_seed(4)))
    with pytest.raises(ValueError, match="distill.width needs distill.init: fresh"):
        DistillConfig(width=40)


def test_nfe_accounting():
    flow = tiny_flow(n_blocks=5)
    for k, m, n_students in [(1, 1, 5), (2, 1, 5), (1, 2, 3), (3, 5, 1), (2, 4, 2)]:
        model = distill(flow, FAST.replace(train_steps=1, steps_per_block=k, group_size=m), x_train=data(500))
        assert len(model) == n_students
        assert model.nfe == n_students * k
        out = model.decode(torch.randn(10, 2, dtype=torch.float64))
        assert sum(out.nfe) == model.nfe
        # Count real calls of the networks.
        calls: list[int] = []
        hooks = [s.net.register_forward_hook(lambda *a, calls=calls: calls.append(1)) for s in model.students]
        model.sample(7, generator=torch.Generator().manual_seed(0))
        for h in hooks:
            h.remove()
        assert len(calls) == model.nfe


def test_merging_covers_blocks_and_matches_teacher():
    flow = tiny_flow(n_blocks=4)
    model = distill(flow, FAST.replace(group_size=2, steps_per_block=2, train_steps=600), x_train=data())
    assert [(s.first, s.last) for s in model.students] == [(0, 1), (2, 3)]
    assert relative_map_error(flow, model) < 0.05
    whole = distill(flow, FAST.replace(group_size=10, steps_per_block=1, train_steps=1), x_train=data(500))
    assert [(s.first, s.last) for s in whole.students] == [(0, 3)]


def test_pools_argument_equals_x_train_pushforward():
    flow = tiny_flow(n_blocks=2)
    x = data(300)
    pools = [flow.standardizer(x)]
    for block in flow.blocks:
        pools.append(block.forward(pools[-1], solver=flow.solver).x)
    cfg = FAST.replace(train_steps=20, generation_fraction=0.0, val_pairs=0)
    a = distill(flow, cfg, x_train=x, generator=torch.Generator().manual_seed(0))
    b = distill(flow, cfg, pools=pools, generator=torch.Generator().manual_seed(0))
    for sa, sb in zip(a.students, b.students, strict=True):
        for pa, pb in zip(sa.parameters(), sb.parameters(), strict=True):
            torch.testing.assert_close(pa, pb)


def test_save_load_round_trip_gives_identical_samples(tmp_path):
    flow = tiny_flow()
    model = distill(flow, FAST.replace(train_steps=30, steps_per_block=2, group_size=2), x_train=data(500))
    path = model.save(tmp_path / "d")
    assert is_distilled(path) and not is_distilled(tmp_path) and not is_distilled(tmp_path / "missing")
    assert not is_distilled(flow.save(tmp_path / "teacher"))
    back = load_distilled(path)
    assert back.nfe == model.nfe and back.config == model.config and back.teacher_config == flow.config
    a = model.sample(100, generator=torch.Generator().manual_seed(3))
    b = back.sample(100, generator=torch.Generator().manual_seed(3))
    assert a.dtype == b.dtype == torch.float64
    assert torch.equal(a, b)
    assert back.log[0]["blocks"] == [0, 1]


def test_load_detects_tampering(tmp_path):
    from localfm.checkpoint import CheckpointError

    model = distill(tiny_flow(n_blocks=1), FAST.replace(train_steps=1), x_train=data(100))
    path = model.save(tmp_path / "d")
    raw = bytearray((path / "model.safetensors").read_bytes())
    raw[-1] ^= 1
    (path / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum"):
        load_distilled(path)
    with pytest.raises(CheckpointError, match="no distilled"):
        load_distilled(tmp_path / "nothing")


def test_log_prob_raises():
    model = distill(tiny_flow(n_blocks=1), FAST.replace(train_steps=1), x_train=data(100))
    with pytest.raises(NoLikelihoodError, match="no exact likelihood"):
        model.log_prob(torch.zeros(3, 2))
    assert isinstance(NoLikelihoodError(), NotImplementedError)


@pytest.mark.parametrize(
    "key, value",
    [
        ("steps_per_block", 0),
        ("group_size", -1),
        ("train_steps", 0),
        ("batch_size", 1.5),
        ("lr", 0.0),
        ("generation_fraction", 1.5),
        ("data_pairs", 0),
        ("grad_clip", -1.0),
        ("val_pairs", -1),
        ("width", 0),
    ],
)
def test_bad_config_raises_naming_the_key(key, value):
    with pytest.raises(ValueError, match=f"distill.{key}"):
        DistillConfig(**{key: value})


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="steps_per_block"):
        DistillConfig.from_dict({"steps_per_blok": 2})
    cfg = DistillConfig.from_dict({"steps_per_block": 2, "solver": {"method": "rk4", "steps": 2}})
    assert cfg.steps_per_block == 2 and cfg.solver == SolverConfig("rk4", steps=2)


def test_needs_data_unless_generation_only():
    with pytest.raises(ValueError, match="x_train"):
        distill(tiny_flow(n_blocks=1), FAST)


def test_distill_run_writes_beside_the_model(tmp_path):
    flow = tiny_flow(n_blocks=2)
    flow.save(tmp_path / "model")
    seen = []

    def load_data(cfg):
        seen.append(cfg)
        return data(200)

    path = distill_run(tmp_path, 2, load_data=load_data, config={"train_steps": 5, "generation_pairs": 200})
    assert path == tmp_path / "distilled-k2" and is_distilled(path)
    assert seen == [flow.config]
    assert load_distilled(path).nfe == 4
    merged = distill_run(tmp_path, 1, group_size=2, load_data=load_data, config=FAST.replace(train_steps=5))
    assert merged.name == "distilled-k1-m2" and load_distilled(merged).nfe == 1


def test_float32_teacher_gives_float32_student():
    flow = tiny_flow(n_blocks=1).float()
    model = distill(flow, FAST.replace(train_steps=2), x_train=data(100).float())
    assert model.sample(5, generator=torch.Generator().manual_seed(0)).dtype == torch.float32
    assert math.isfinite(float(model.sample(5).sum()))


def test_pairs_can_be_reused_and_must_match_the_config():
    flow = tiny_flow(n_blocks=2)
    cfg = FAST.replace(train_steps=3)
    pairs = teacher_pairs(flow, cfg, x_train=data(300), generator=torch.Generator().manual_seed(0))
    assert len(pairs.data) == len(pairs.generation) == len(pairs.val) == len(flow) + 1
    torch.testing.assert_close(pairs.data[0], flow.standardizer(data(300)))
    distill(flow, cfg.replace(steps_per_block=2), pairs=pairs)
    only_data = teacher_pairs(
        flow, cfg.replace(generation_fraction=0.0, val_pairs=0), x_train=data(300), generator=torch.Generator()
    )
    with pytest.raises(ValueError, match="generation_fraction"):
        distill(flow, cfg, pairs=only_data)


def test_sample_checks_n():
    model = distill(tiny_flow(n_blocks=1), FAST.replace(train_steps=1), x_train=data(100))
    with pytest.raises(TypeError, match="n must be"):
        model.sample(2.5)
    with pytest.raises(ValueError, match="n must be"):
        model.sample(0)
    assert model.sample(np.int64(3)).shape == (3, 2)
