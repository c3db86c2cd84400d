"""Configs: frozen dataclasses from YAML or dicts; unknown keys, wrong types and bad values rejected."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from localfm import BlocksConfig, FlowConfig, SolverConfig, TrainConfig, load_config
from localfm.config import from_dict, set_option, to_dict
from localfm.nets import NetConfig, build_net, count_parameters


def test_defaults_and_round_trip_through_yaml(tmp_path):
    assert load_config() == FlowConfig()
    cfg = load_config(
        {
            "seed": 3,
            "dtype": "float64",
            "blocks": {"schedule": "list", "h": [0.15, 0.195, 0.2535], "free_block": True},
            "train": {"steps": [10, 20, 30, 40], "grad_clip": 1.0, "ema": None},
            "solver": {"method": "rk4", "steps": 4},
        }
    )
    assert cfg.blocks.h == (0.15, 0.195, 0.2535) and cfg.train.steps == (10, 20, 30, 40)
    assert cfg.blocks.steps() == [0.15, 0.195, 0.2535, None]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(path) == cfg
    assert load_config(str(path)) == cfg
    assert load_config(cfg) is cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_yaml_numbers_without_a_dot(tmp_path):
    """YAML 1.1 reads ``1e-3`` as a string; a number setting still takes it (the paper's lrs look so)."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 2e-4\n  weight_decay: 1E-6\nsolver:\n  rtol: 1e-7\n")
    cfg = load_config(path)
    assert cfg.train.lr == 2e-4 and cfg.train.weight_decay == 1e-6 and cfg.solver.rtol == 1e-7
    assert load_config(None, ["train.lr=3e-4"]).train.lr == 3e-4
    with pytest.raises(TypeError, match="config.train.lr: expected a number, got 'fast'"):
        load_config({"train": {"lr": "fast"}})


def test_overrides():
    cfg = load_config({"train": {"lr": 0.1}}, ["train.lr=0.5", "blocks.L=2", "solver.method=rk4", "seed=9"])
    assert (cfg.train.lr, cfg.blocks.L, cfg.solver.method, cfg.seed) == (0.5, 2, "rk4", 9)
    assert len(cfg.blocks.steps()) == 3
    with pytest.raises(ValueError, match="key=value"):
        set_option({}, "train.lr")
    with pytest.raises(ValueError, match="not a group of settings"):
        load_config({"seed": 1}, ["seed.x=1"])


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"trian": {}}, r"config: unknown key 'trian'; did you mean 'train'\?"),
        ({"train": {"lr_schedul": "step"}}, r"config.train: unknown key 'lr_schedul'; did you mean 'lr_schedule'\?"),
        ({"solver": {"methd": "rk4"}}, r"did you mean 'method'"),
        ({"zzz": 1}, r"unknown key 'zzz'; known keys: .*train"),
    ],
)
def test_unknown_keys_are_rejected_with_a_suggestion(data, match):
    with pytest.raises(ValueError, match=match):
        load_config(data)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"train": {"lr": "fast"}}, "config.train.lr: expected a number"),
        ({"train": {"batch_size": 2.5}}, "config.train.batch_size: expected an integer"),
        ({"train": {"batch_size": True}}, "config.train.batch_size: expected an integer"),
        ({"train": {"warm_start": "yes"}}, "config.train.warm_start: expected true or false"),
        ({"train": {"steps": "many"}}, "config.train.steps"),
        ({"train": {"steps": [10, "x"]}}, "config.train.steps"),
        ({"blocks": {"h": 0.1}}, "config.blocks.h: expected a list"),
        ({"net": 3}, "config.net: expected a mapping"),
        ({"solver": {"method": 4}}, "config.solver.method: expected a string"),
    ],
)
def test_wrong_types_raise_type_error_naming_the_key(data, match):
    with pytest.raises(TypeError, match=match):
        load_config(data)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"train": {"lr": -1e-3}}, "train.lr must be > 0"),
        ({"train": {"lr": float("nan")}}, "train.lr"),
        ({"train": {"lr": float("inf")}}, "train.lr"),
        ({"train": {"weight_decay": float("nan")}}, "train.weight_decay"),
        ({"train": {"batch_size": 0}}, "train.batch_size must be >= 1"),
        ({"train": {"steps": 0}}, "train.steps"),
        ({"train": {"ema": 1.5}}, "train.ema"),
        ({"train": {"gamma": 0.0}}, "train.gamma"),
        ({"train": {"pairing": "random"}}, "train.pairing"),
        ({"train": {"interpolant": "cosine"}}, "interpolant"),
        ({"train": {"time_dist": "beta", "time_a": 0.0}}, "a > 0"),
        ({"train": {"lr_schedule": "linear"}}, "train.lr_schedule"),
        ({"train": {"steps": [10, 20]}, "blocks": {"L": 2}}, "train.steps lists 2 values but the flow has 3 blocks"),
        ({"blocks": {"c": -0.1}}, "c > 0"),
        ({"blocks": {"L": -1}}, "L must be >= 0"),
        ({"blocks": {"schedule": "list", "h": [0.1, -0.2]}}, r"h\[1\]"),
        ({"blocks": {"h": [0.1]}}, "set schedule: list"),
        ({"blocks": {"schedule": "list", "free_block": False}}, "no blocks"),
        ({"blocks": {"schedule": "cosine"}}, "blocks.schedule"),
        ({"net": {"width": 0}}, "net.width"),
        ({"net": {"activation": "swish"}}, "net.activation"),
        ({"net": {"beta": float("nan")}}, "net.beta"),
        ({"solver": {"method": "rk45"}}, "solver.method"),
        ({"solver": {"steps": 0}}, "solver.steps"),
        ({"dtype": "float16"}, "dtype"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_out_of_range_values_raise_value_error_naming_the_key(data, match):
    with pytest.raises(ValueError, match=match):
        load_config(data)


def test_block_schedules():
    assert BlocksConfig(schedule="geometric", c=0.1, rho=2.0, L=3).steps() == pytest.approx([0.1, 0.2, 0.4, None])
    assert BlocksConfig(schedule="constant", c=0.25, L=3, free_block=False).steps() == [0.25, 0.25, 0.25]
    assert BlocksConfig(L=0).steps() == [None]  # the FM baseline: one free block
    assert BlocksConfig(schedule="list", h=(0.05,), free_block=False).steps() == [0.05]


def test_train_steps_per_block():
    assert TrainConfig(steps=5).steps_for(3) == [5, 5, 5]
    assert TrainConfig(steps=(1, 2)).steps_for(2) == [1, 2]
    with pytest.raises(ValueError, match="train.steps lists 2 values"):
        TrainConfig(steps=(1, 2)).steps_for(3)


def test_load_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping of settings"):
        load_config(top)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == FlowConfig()


def test_from_dict_builds_each_group():
    assert from_dict(NetConfig, {"width": 8}) == NetConfig(width=8)
    assert from_dict(SolverConfig, {"method": "euler", "steps": 3}) == SolverConfig("euler", 3)
    with pytest.raises(TypeError, match="expected a mapping"):
        from_dict(NetConfig, [1, 2])


def test_direct_construction_rejects_non_finite_values():
    with pytest.raises(ValueError, match="train.lr"):
        TrainConfig(lr=float("inf"))
    with pytest.raises(ValueError, match="train.weight_decay"):
        TrainConfig(weight_decay=float("nan"))
    with pytest.raises(ValueError, match="net.beta"):
        NetConfig(beta=float("nan"))


_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(
    ("name", "dim"), [("tree", 2), ("rose", 2), ("power", 6), ("gas", 8), ("miniboone", 43), ("bsds300", 63)]
)
def test_authors_configs_keep_trig_and_pair_with_an_fm_twin_of_equal_size(name: str, dim: int) -> None:
    """configs/NAME.yaml follows the authors' setting (trig interpolant, written out since the library's
    default is linear); NAME_fm.yaml is one block with the same total parameters and the same recipe."""
    total = {}
    for twin in (name, f"{name}_fm"):
        cfg = load_config(_CONFIGS / f"{twin}.yaml")
        assert cfg.train.interpolant == "trig", twin
        with torch.device("meta"):
            per_block = count_parameters(build_net(dim, cfg.net))
        total[twin] = (per_block * len(cfg.blocks.steps()), cfg)
    (lfm_params, lfm), (fm_params, fm) = total[name], total[f"{name}_fm"]
    assert len(lfm.blocks.steps()) > 1 and fm.blocks.steps() == [None]
    assert abs(lfm_params / fm_params - 1) < 0.01
    # not warm_start: FM has no earlier block to start from
    same = ("batch_size", "lr", "lr_schedule", "gamma", "time_dist", "time_a", "time_b")
    assert {k: getattr(lfm.train, k) for k in same} == {k: getattr(fm.train, k) for k in same}


def test_library_default_interpolant_is_linear() -> None:
    assert TrainConfig().interpolant == "linear"
    assert load_config({}).train.interpolant == "linear"
