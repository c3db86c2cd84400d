"""Checkpoints: tampering is refused, pickles never run, damage falls back, divergence stops cleanly."""

from __future__ import annotations

import json
import logging
import shutil

import _robustness_cases as cases
import pytest
import torch
from conftest import tiny_config
from torch import nn

import localfm
from localfm import CheckpointError, TrainingDivergedError
from localfm.checkpoint import sha256
from localfm.runstate import _checkpoints, latest


def _data(n: int = 128, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    flow = localfm.fit(_data(), tiny_config())
    folder = localfm.save(flow, tmp_path_factory.mktemp("model") / "model")
    return flow, folder


@pytest.fixture
def model_copy(saved_model, tmp_path):
    flow, folder = saved_model
    return flow, shutil.copytree(folder, tmp_path / "model")


def _rewrite_json(path, edit) -> None:
    """Edit a checkpoint's JSON and recompute its checksum: a deliberate, self-consistent edit."""
    meta = json.loads(path.read_text())
    meta.pop("json_sha256")
    edit(meta)
    meta["json_sha256"] = sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    path.write_text(json.dumps(meta))


def test_round_trip_is_exact(model_copy):
    flow, folder = model_copy
    assert cases.same_flow(flow, localfm.load(folder))


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(h=[0.3, None]),  # the step sizes
        lambda m: m["config"]["train"].update(lr=0.5),  # the config
        lambda m: m.update(training_log=[]),
    ],
)
def test_edited_json_is_refused(model_copy, edit):
    _, folder = model_copy
    meta = json.loads((folder / "flow.json").read_text())
    edit(meta)
    (folder / "flow.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"flow\.json was modified"):
        localfm.load(folder)


def test_json_without_checksum_is_refused(model_copy):
    _, folder = model_copy
    meta = json.loads((folder / "flow.json").read_text())
    del meta["json_sha256"]
    (folder / "flow.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="no json_sha256"):
        localfm.load(folder)


@pytest.mark.parametrize("how", ["flip", "truncate", "append"])
def test_tampered_tensors_are_refused(model_copy, how):
    _, folder = model_copy
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[-3] ^= 0x40  # inside the last tensor's bytes
    elif how == "truncate":
        data = data[: len(data) // 2]
    else:
        data += b"\0"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match the checksum"):
        localfm.load(folder)


@pytest.mark.parametrize("payload", ["pickle", "torch_save"])
@pytest.mark.parametrize("checksum", ["stale", "recomputed"])
def test_pickle_payload_is_never_executed(model_copy, tmp_path, payload, checksum):
    """A pickle (or a torch.save zip) posing as model.safetensors is refused and never unpickled,
    even when the attacker also fixes up the checksum recorded in flow.json."""
    _, folder = model_copy
    marker = tmp_path / "PWNED"
    data = cases.pickle_payload(marker) if payload == "pickle" else cases.torch_save_payload(marker)
    (folder / "model.safetensors").write_bytes(data)
    if checksum == "recomputed":
        _rewrite_json(folder / "flow.json", lambda m: m.update(tensors_sha256=sha256(data)))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        localfm.load(folder)
    assert not marker.exists()
    # The payload is live: unpickling it would have created the marker.
    import pickle

    pickle.loads(cases.pickle_payload(marker))
    assert marker.exists()


def test_pickle_as_json_is_refused(model_copy, tmp_path):
    _, folder = model_copy
    marker = tmp_path / "PWNED"
    (folder / "flow.json").write_bytes(cases.pickle_payload(marker))
    with pytest.raises(CheckpointError, match=r"flow\.json is not valid JSON"):
        localfm.load(folder)
    assert not marker.exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(format_version=2), "format version 2, this localfm"),
        (lambda m: m.update(format="something-else"), "not a localfm-flow checkpoint"),
        (lambda m: m["config"]["net"].update(width=17), r"has shape \(.*16.*\), expected \(.*17"),
        (lambda m: m["config"]["net"].update(width=2**20), "has shape"),  # checked before allocating
        (lambda m: m["config"]["net"].update(width=10**12), "cannot rebuild the model"),
        (lambda m: m.update(h=[0.2]), "tensor names do not match"),
        (lambda m: m.update(event_shape=[3]), "has shape"),
        (lambda m: m.update(event_shape=[-1]), "positive integers"),
        (lambda m: m.update(h=["0.2", None]), "must be a number > 0"),
        (lambda m: m.pop("solver"), "invalid metadata"),
        (lambda m: m["config"].update(bogus=1), "unknown key 'bogus'"),
        (lambda m: m.pop("tensors_sha256"), "no tensors_sha256"),
    ],
)
def test_wrong_version_format_or_shapes(model_copy, edit, message):
    _, folder = model_copy
    _rewrite_json(folder / "flow.json", edit)
    with pytest.raises(CheckpointError, match=message):
        localfm.load(folder)


def test_non_float_or_non_finite_tensors_are_refused(model_copy):
    from safetensors.torch import load_file, save_file

    _, folder = model_copy
    tensors = load_file(folder / "model.safetensors")
    name = next(k for k in tensors if k.startswith("blocks."))
    for bad, message in [(torch.full_like(tensors[name], float("nan")), "non-finite"), (tensors[name].long(), "dtype")]:
        save_file({**tensors, name: bad}, folder / "model.safetensors")
        data = (folder / "model.safetensors").read_bytes()
        _rewrite_json(folder / "flow.json", lambda m, data=data: m.update(tensors_sha256=sha256(data)))
        with pytest.raises(CheckpointError, match=message):
            localfm.load(folder)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no localfm checkpoint"):
        localfm.load(tmp_path / "nothing-here")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "flow.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        localfm.load(tmp_path / "junk")


def test_interrupted_save_swap_finds_previous_copy(model_copy):
    flow, folder = model_copy
    folder.rename(folder.with_name(f".{folder.name}.old-12345"))  # killed between the two renames
    assert cases.same_flow(flow, localfm.load(folder))
    localfm.save(flow, folder)  # the next save cleans up
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


# ---------------------------------------------------------------------------------------------
# Training checkpoints: falling back to the newest good one


CFG = tiny_config(
    blocks={"schedule": "list", "h": [0.2, 0.4], "free_block": True},
    train={"steps": 20, "checkpoint_every": 6, "keep_checkpoints": 20, "log_every": 5},
)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "run"
    flow = localfm.fit(_data(), CFG, run_dir=run)
    return flow, run


@pytest.fixture
def run_copy(trained_run, tmp_path):
    flow, run = trained_run
    return flow, shutil.copytree(run, tmp_path / "run")


def _damage_truncate(d):
    p = d / "state.safetensors"
    p.write_bytes(p.read_bytes()[:100])


def _damage_json(d):
    meta = json.loads((d / "state.json").read_text())
    meta["step"] += 1
    (d / "state.json").write_text(json.dumps(meta))


def _damage_pool(d):
    pool = json.loads((d / "state.json").read_text())["pool_file"]
    (d.parent / pool).unlink()


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_json, _damage_pool])
def test_resume_skips_damaged_checkpoints(run_copy, damage, caplog):
    flow, run = run_copy
    ckpts = _checkpoints(run / "checkpoints")
    newest = ckpts[0]
    assert newest.name == "b03-s0000000"
    damage(newest)
    with caplog.at_level(logging.WARNING, logger="localfm.runstate"):
        saved = latest(run, CFG, (128, 2), dtype=torch.float64)
    assert f"skipping damaged checkpoint {newest.name}" in caplog.text
    if damage is _damage_pool:  # every checkpoint of block 3 needs that pool: back to block 2
        assert saved.path.name.startswith("b02-")
    else:
        assert saved.path == ckpts[1]
    resumed = localfm.fit(_data(), CFG, run_dir=run, resume=True)
    assert cases.same_flow(flow, resumed)  # bit-identical to the run that was never damaged
    assert (run / "checkpoints" / f"damaged-{newest.name}").is_dir() or damage is _damage_pool


def test_all_checkpoints_damaged_is_an_error_not_a_silent_restart(run_copy):
    _, run = run_copy
    for d in _checkpoints(run / "checkpoints"):
        _damage_truncate(d)
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        localfm.fit(_data(), CFG, run_dir=run, resume=True)


def test_pickle_in_training_state_is_never_executed(run_copy, tmp_path):
    flow, run = run_copy
    marker = tmp_path / "PWNED"
    newest = _checkpoints(run / "checkpoints")[0]
    data = cases.pickle_payload(marker)
    (newest / "state.safetensors").write_bytes(data)
    _rewrite_json(newest / "state.json", lambda m: m.update(tensors_sha256=sha256(data)))
    saved = latest(run, CFG, (128, 2), dtype=torch.float64)
    assert saved.path != newest and not marker.exists()


def test_kept_checkpoints_keep_their_pools(tmp_path):
    cfg = CFG.replace(train=CFG.train.__class__(**{**CFG.train.__dict__, "keep_checkpoints": 2}))
    run = tmp_path / "run"
    localfm.fit(_data(), cfg, run_dir=run)
    assert cases.check_run_dir(run) == []
    kept = _checkpoints(run / "checkpoints")
    assert len(kept) == 2
    pools = {json.loads((d / "state.json").read_text())["pool_file"] for d in kept}
    assert {p.name for p in (run / "checkpoints").glob("pool-*")} == pools


def test_new_run_refuses_a_folder_with_checkpoints(run_copy):
    _, run = run_copy
    with pytest.raises(ValueError, match="already holds checkpoints"):
        localfm.fit(_data(), CFG, run_dir=run)


def test_resume_refuses_a_changed_model_but_takes_a_lower_lr(run_copy):
    _, run = run_copy
    wider = CFG.replace(net=CFG.net.__class__(**{**CFG.net.__dict__, "width": 32}))
    with pytest.raises(ValueError, match=r"config differs in \['net.width'\]"):
        localfm.fit(_data(), wider, run_dir=run, resume=True)
    slower = CFG.replace(train=CFG.train.__class__(**{**CFG.train.__dict__, "lr": 1e-4}))
    flow = localfm.fit(_data(), slower, run_dir=run, resume=True)
    assert flow.config.train.lr == 1e-4


# ---------------------------------------------------------------------------------------------
# Divergence


class NaNAfter(nn.Module):
    """A velocity network whose output turns NaN after ``after`` training calls (or when pushing)."""

    def __init__(self, dim: int, after: int, in_push: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(dim + 1, dim)
        self.after, self.in_push = after, in_push
        self.calls = 0

    def forward(self, x, t):
        out = self.lin(torch.cat([x, t.to(x.dtype).reshape(-1, 1).expand(len(x), 1)], 1))
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                return out * float("nan")
        elif self.in_push:
            return out * float("inf")
        return out


@pytest.mark.parametrize("after, caught", [(23, 25), (25, 28)])
def test_nan_loss_stops_with_block_step_and_remedy(tmp_path, after, caught):
    """NaN from step ``after + 1`` is caught at the next report (every 5) or checkpoint (every 7),
    whichever comes first: a diverged state is never checkpointed."""
    run = tmp_path / "run"
    cfg = tiny_config(train={"steps": 40, "checkpoint_every": 7, "log_every": 5})
    with pytest.raises(TrainingDivergedError) as info:
        localfm.fit(_data(), cfg, run_dir=run, net_factory=lambda d, c: NaNAfter(d, after=after))
    err = info.value
    assert (err.block, err.step) == (0, caught)
    msg = str(err)
    assert f"block 1 at step {caught}" in msg and "the loss is nan" in msg
    assert "Lower train.lr" in msg and "b00-s0000021" in msg
    saved = latest(run, cfg, (128, 2), net_factory=lambda d, c: NaNAfter(d, after=0), dtype=torch.float64)
    assert saved.path.name == "b00-s0000021" and saved.step == 21
    assert all(torch.isfinite(p).all() for p in saved.block_state.net.parameters())


def test_non_finite_pushforward_is_divergence(tmp_path):
    cfg = tiny_config(train={"steps": 10})
    with pytest.raises(TrainingDivergedError, match="block 1 in the pushforward"):
        localfm.fit(_data(), cfg, net_factory=lambda d, c: NaNAfter(d, after=10**9, in_push=True))


def test_huge_learning_rate_diverges_cleanly(tmp_path):
    cfg = tiny_config(dtype="float32", train={"steps": 200, "lr": 1e30, "checkpoint_every": 5})
    with pytest.raises(TrainingDivergedError, match=r"training diverged in block 1 at step \d+"):
        localfm.fit(_data().float(), cfg, run_dir=tmp_path / "run")
    saved = latest(tmp_path / "run", cfg, (128, 2))
    assert saved is None or all(torch.isfinite(p).all() for p in saved.block_state.net.parameters())
