"""Property-based: malformed configs, data files and checkpoints end in the documented error.

Library loaders raise ``ValueError`` / ``TypeError`` / ``FileNotFoundError`` / ``CheckpointError``
(never another exception, a hang or a silently different model); the CLI exits with status 2 and
one line ``localfm: error: ...`` on stderr, never a traceback.
"""

from __future__ import annotations

import math
import random
import shutil
import tempfile
from pathlib import Path

import _robustness_cases as cases
import numpy as np
import pytest
import torch
from conftest import tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import localfm
from localfm import CheckpointError

LIBRARY_ERRORS = (ValueError, TypeError, FileNotFoundError, CheckpointError)
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(
    max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)

seeds = st.integers(0, 2**32 - 1)
leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
values = st.recursive(
    leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=8
)
groups = {
    g: st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), values, max_size=4)
    for g, keys in cases.SCHEMA.items()
    if g
}
configs = st.fixed_dictionaries(
    {}, optional={**groups, "seed": values, "dtype": values, "device": values, "data": values, "bogus": values}
)


def _expect_library_error(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except LIBRARY_ERRORS:
        return None


# ---------------------------------------------------------------------------------------------
# Configs


@FAST
@given(configs)
def test_config_dicts(data):
    cfg = _expect_library_error(localfm.load_config, data)
    assert cfg is None or isinstance(cfg, localfm.FlowConfig)


@FAST
@given(seeds)
def test_config_dicts_from_the_schema(seed):
    cfg = _expect_library_error(localfm.load_config, cases.malformed_config(random.Random(seed)))
    assert cfg is None or isinstance(cfg, localfm.FlowConfig)


@FAST
@given(st.one_of(st.text(max_size=200), seeds.map(lambda s: cases.malformed_yaml(random.Random(s)))))
def test_config_yaml_files(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        cfg = _expect_library_error(localfm.load_config, path)
        assert cfg is None or isinstance(cfg, localfm.FlowConfig)
        assert not Path("PWNED").exists()


# ---------------------------------------------------------------------------------------------
# Data


@FAST
@given(
    st.one_of(
        st.lists(st.lists(st.one_of(st.floats(), st.text(max_size=3), st.none()), max_size=3), max_size=4),
        st.sampled_from(
            [
                np.zeros((0, 2)),
                np.array([[1.0, np.nan]] * 3),
                np.arange(4.0),
                np.array([["a", "b"]] * 3),
                np.array([[1 + 1j, 2]] * 3),
                np.array([[object(), 1.0]] * 3, dtype=object),
                torch.tensor([[True, False]] * 3),
                torch.zeros(1, 2),
                "not data",
            ]
        ),
    )
)
def test_fit_rejects_malformed_data(x):
    flow = _expect_library_error(localfm.fit, x, tiny_config(train={"steps": 1}))
    assert flow is None or isinstance(flow, localfm.LocalFlow)  # a few generated lists are valid data


@FAST
@given(seeds)
def test_user_data_files(seed):
    from localfm import datasets

    with tempfile.TemporaryDirectory() as tmp:
        path = cases.malformed_data(random.Random(seed), Path(tmp))
        ds = _expect_library_error(datasets.load_user_file, path)
        if ds is not None:  # the few well-formed files must load as finite float32 data
            assert np.isfinite(ds.train).all() and ds.train.ndim == 2


# ---------------------------------------------------------------------------------------------
# Checkpoints: random damage to real checkpoint files


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    x = torch.randn(128, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cfg = tiny_config(train={"steps": 12, "checkpoint_every": 5, "keep_checkpoints": 10})
    root = tmp_path_factory.mktemp("pristine")
    flow = localfm.fit(x, cfg, run_dir=root / "run")
    localfm.save(flow, root / "model")
    return flow, root, cfg, x


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=seeds, kind=st.sampled_from(cases.DAMAGE_KINDS))
def test_damaged_model_is_refused_or_unchanged(pristine, seed, kind):
    flow, root, _, _ = pristine
    with tempfile.TemporaryDirectory() as tmp:
        folder = shutil.copytree(root / "model", Path(tmp) / "model")
        marker = Path(tmp) / "PWNED"
        what = cases.damage(random.Random(seed), folder, "flow.json", "model.safetensors", marker, kind)
        cases.check_damaged_model(flow, folder, marker, what)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=seeds, kind=st.sampled_from(cases.DAMAGE_KINDS))
def test_damaged_training_checkpoint_falls_back(pristine, seed, kind):
    _, root, cfg, x = pristine
    with tempfile.TemporaryDirectory() as tmp:
        run = shutil.copytree(root / "run", Path(tmp) / "run")
        cases.check_damaged_training_checkpoint(run, cfg, tuple(x.shape), seed, kind, Path(tmp) / "PWNED")


# ---------------------------------------------------------------------------------------------
# The command line (slow: one interpreter per example)


@pytest.fixture(scope="module")
def cli():
    pytest.importorskip("localfm.cli")


@SLOW
@given(seed=seeds)
def test_cli_train_with_malformed_config(cli, seed):
    with tempfile.TemporaryDirectory() as tmp:
        cases.cli_train_case(random.Random(seed), Path(tmp))


@SLOW
@given(seed=seeds, kind=st.sampled_from(cases.DAMAGE_KINDS), command=st.sampled_from(["eval", "sample"]))
def test_cli_on_damaged_model(cli, pristine, seed, kind, command):
    with tempfile.TemporaryDirectory() as tmp:
        cases.cli_damaged_model_case(random.Random(seed), pristine[1] / "model", Path(tmp), kind, command)


def test_cli_nonsense_arguments(cli, tmp_path):
    (tmp_path / "x.yaml").write_text("train: {lr: 1e-3}\n")
    for args in (["eval", "no-such-run"], ["train", "x.yaml", "--set", "train.lr"]):
        cases.assert_one_line_error(cases.cli(*args, cwd=tmp_path))


def test_nan_is_not_a_config_value():
    assert _expect_library_error(localfm.load_config, {"train": {"lr": math.nan}}) is None
