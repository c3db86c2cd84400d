"""Pools on disk (train.pool_storage): same training as in memory, files whole or absent, resumable."""

from __future__ import annotations

import json
import tempfile

import numpy as np
import pytest
import torch
from conftest import F64, assert_same_params, tiny_config
from test_training import data, interrupt_at, record_steps

import localfm
from localfm import pools, training
from localfm.checkpoint import CheckpointError


def config(storage: str, **train):
    return tiny_config(
        blocks={"h": [0.2, 0.3], "free_block": True},
        train={
            "steps": 10,
            "checkpoint_every": 5,
            "log_every": 1,
            "keep_checkpoints": 20,
            **train,
            "pool_storage": storage,
        },
    )


@pytest.mark.parametrize("extra", [{}, {"push_points": 100, "push_batch_size": 32}, {"pairing": "independent"}])
def test_pools_on_disk_train_exactly_as_in_memory(tmp_path, monkeypatch, extra):
    x = data(300)
    reference = localfm.fit(x, config("device", **extra))
    seen = []
    real = training.train_block

    def spy(state, pool, *args, **kwargs):
        seen.append(pool)
        return real(state, pool, *args, **kwargs)

    monkeypatch.setattr(training, "train_block", spy)
    on_disk = localfm.fit(x, config("disk", **extra), run_dir=tmp_path)
    assert_same_params(on_disk, reference)
    # Blocks after the first trained on memory maps of the pool files the checkpoints refer to.
    ckpt = tmp_path / "checkpoints"
    files = sorted(ckpt.glob("pool-b*.npy"))
    assert [f.name[:8] for f in files] == ["pool-b01", "pool-b02"] and not list(ckpt.glob("*.safetensors"))
    assert json.loads((ckpt / "b02-s0000000" / "state.json").read_text())["pool_file"] == files[1].name
    for f, pool in zip(files, seen[1:], strict=True):
        assert torch.equal(pool, torch.from_numpy(np.load(f)))
        assert not pool.untyped_storage().resizable()  # a view of a mapped file, not an owned tensor
    assert seen[1].shape[0] == extra.get("push_points", 300)
    if "push_points" not in extra:  # pool 1 is every training point pushed through block 1
        pushed = on_disk.blocks[0].forward(on_disk.standardizer(x), solver=on_disk.config.solver).x
        torch.testing.assert_close(seen[1], pushed)
    # Without a run folder the pools live in a temporary folder that fit removes.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert_same_params(localfm.fit(x, config("disk", **extra)), reference)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_pools_on_disk_with_a_context():
    x = data(300)
    c = (x[:, :1] > 1).to(F64)
    net = {"width": 16, "depth": 2, "activation": "tanh", "context_dim": 1}
    cfgs = [
        tiny_config(
            net=net, blocks={"h": [0.2], "free_block": True}, train={"steps": 10, "push_points": 90, "pool_storage": s}
        )
        for s in ("device", "disk")
    ]
    ref = localfm.fit(x, cfgs[0], context=c)
    assert_same_params(localfm.fit(x, cfgs[1], context=c), ref)


@pytest.mark.parametrize(("first", "then"), [("disk", "disk"), ("disk", "device"), ("device", "disk")])
def test_resume_with_pools_on_disk_matches_an_uninterrupted_run(tmp_path, first, then):
    x = data(300)
    reference = localfm.fit(x, config("device"))
    with pytest.raises(KeyboardInterrupt):
        localfm.fit(x, config(first), run_dir=tmp_path, callback=interrupt_at(2, 7))
    steps = []
    resumed = localfm.fit(x, config(then), run_dir=tmp_path, resume=True, callback=record_steps(steps))
    assert steps[0] == (2, 6)
    assert_same_params(resumed, reference)
    if then == "disk":  # the resumed run trains from (and its checkpoints refer to) a pool file
        last = sorted((tmp_path / "checkpoints").glob("b03-*"))[-1]
        assert json.loads((last / "state.json").read_text())["pool_file"].endswith(".npy")


def test_a_damaged_pool_file_is_never_trained_on(tmp_path, caplog):
    x = data(300)
    reference = localfm.fit(x, config("device"))
    with pytest.raises(KeyboardInterrupt):
        localfm.fit(x, config("disk"), run_dir=tmp_path, callback=interrupt_at(1, 7))
    (pool_file,) = (tmp_path / "checkpoints").glob("pool-b01-*.npy")
    array = np.load(pool_file, mmap_mode="r+")
    array[3, 1] += 1.0  # the same size and header: only the checksum tells
    array.flush()
    del array
    steps = []
    resumed = localfm.fit(x, config("disk"), run_dir=tmp_path, resume=True, callback=record_steps(steps))
    assert steps[0] == (0, 6)  # every block-1 checkpoint was skipped: block 0's last one was used
    assert "does not match the checksum" in caplog.text
    assert_same_params(resumed, reference)


def test_pool_writer_leaves_a_whole_file_or_none(tmp_path):
    with pytest.raises(RuntimeError, match="killed"), pools.PoolWriter(tmp_path, 1, (10, 3), torch.float32) as w:
        w.tensor[:5] = 1.0
        raise RuntimeError("killed half way")
    assert list(tmp_path.iterdir()) == []
    with pools.PoolWriter(tmp_path, 1, (10, 3), torch.float64) as w:
        assert [p.name.startswith(".") for p in tmp_path.iterdir()] == [True]  # unfinished: a hidden name
        w.tensor.copy_(torch.arange(30, dtype=F64).reshape(10, 3))
        pool, file = w.finish()
    assert [p.name for p in tmp_path.iterdir()] == [file.path.name] and file.path.name.startswith("pool-b01-")
    assert file.path.name[9:25] == file.sha256[:16] == pools.file_sha256(file.path)[:16]
    assert torch.equal(pool, torch.arange(30, dtype=F64).reshape(10, 3))
    pool[0, 0] = -1.0  # copy-on-write: the tensor is writable, the file never changes
    assert torch.equal(pools.open_pool(file.path, file.sha256)[0], torch.tensor([0.0, 1.0, 2.0], dtype=F64))


def test_open_pool_rejects_what_is_not_a_pool(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(CheckpointError, match="not a NumPy array file"):  # never unpickled
        pools.open_pool(tmp_path / "objects.npy")
    np.save(tmp_path / "ints.npy", np.zeros((4, 2), dtype=np.int64))
    with pytest.raises(CheckpointError, match="float32 or float64"):
        pools.open_pool(tmp_path / "ints.npy")
    bad = np.zeros((4, 2))
    bad[2, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(CheckpointError, match="non-finite"):
        pools.open_pool(tmp_path / "nan.npy", pools.file_sha256(tmp_path / "nan.npy"))
    with pytest.raises(CheckpointError, match="missing pool file"):
        pools.open_pool(tmp_path / "absent.npy")


def test_auto_storage_goes_to_disk_when_a_pool_would_not_fit(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(pools, "free_memory", lambda device: 1e6)
    assert pools.wants_disk("auto", (1000, 200), torch.float32, cpu)  # 800 kB > half of 1 MB
    assert not pools.wants_disk("auto", (1000, 100), torch.float32, cpu)  # 400 kB
    assert pools.wants_disk("disk", (2, 1), torch.float32, cpu) and not pools.wants_disk(
        "device", (10**9, 10), torch.float32, cpu
    )
    assert pools.free_memory(cpu) > 0


def test_pool_storage_is_validated():
    with pytest.raises(ValueError, match="pool_storage must be auto, device or disk"):
        tiny_config(train={"pool_storage": "ram"})


def test_a_run_refused_by_its_folder_writes_no_pool(tmp_path):
    x = data(300)
    localfm.fit(x, config("disk"), run_dir=tmp_path)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(ValueError, match="already holds checkpoints"):
        localfm.fit(x, config("disk"), run_dir=tmp_path)  # a new run into a used folder
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
