"""User data files: ``.npy``, ``.npz`` and ``.csv``, validated at the boundary.

- ``.npy``: one 2-D numeric array (read with ``allow_pickle=False``).
- ``.npz``: keys ``train``, ``val`` (or ``validation``), ``test`` for given splits; else the key
  ``x``, or the only array in the file.
- ``.csv``: comma-separated numbers, with or without one header line (detected: a first line
  with a non-numeric cell is a header).

Data must be numeric, finite, 2-D with at least `MIN_ROWS` rows; errors name the file, row and
column. Without given splits a seeded shuffle splits 80/10/10 (``fractions``).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from ._base import Dataset, fraction_split, split_rng

MIN_ROWS = 10
SUFFIXES = (".npy", ".npz", ".csv")


def _check_array(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise ValueError(f"{where}: expected numbers, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{where}: complex values are not supported")
    if x.ndim != 2:
        raise ValueError(f"{where}: expected a 2-D array (rows x columns), got shape {x.shape}")
    if x.shape[1] < 1:
        raise ValueError(f"{where}: the array has no columns")
    bad = ~np.isfinite(x.astype(np.float64))
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(f"{where}: non-finite value {x[r, c]!r} at row {r}, column {c} (0-based)")
    return x.astype(np.float32)


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _read_csv(path: Path) -> np.ndarray:
    """Parse a CSV; errors give the line (1-based, as in an editor) and the column (1-based).

    A first line none of whose cells is a number is a header. Fast path: ``np.loadtxt``; if it
    fails or finds non-finite values, a strict cell-by-cell pass finds the first bad cell.
    """
    with open(path, newline="", encoding="utf-8-sig") as f:
        first = next((r for r in csv.reader(f) if any(c.strip() for c in r)), None)
    if first is None:
        raise ValueError(f"{str(path)!r}: the file is empty")
    header = [c.strip() for c in first] if all(_number(c) is None for c in first) else None
    try:
        data = np.loadtxt(
            path,
            delimiter=",",
            skiprows=_header_line(path) if header else 0,
            dtype=np.float64,
            ndmin=2,
            comments=None,
            encoding="utf-8-sig",
        )
        if data.size and np.all(np.isfinite(data)):
            return data
    except ValueError:
        pass
    return _read_csv_strict(path, header)


def _header_line(path: Path) -> int:
    with open(path, encoding="utf-8-sig") as f:
        for i, line in enumerate(f, start=1):
            if line.strip():
                return i
    return 0


def _read_csv_strict(path: Path, header: list[str] | None) -> np.ndarray:
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [(i, r) for i, r in enumerate(csv.reader(f), start=1) if any(c.strip() for c in r)]
    if header is not None:
        rows = rows[1:]
    if not rows:
        raise ValueError(f"{str(path)!r}: the file has a header but no data rows")
    width = len(header) if header else len(rows[0][1])
    out = np.empty((len(rows), width), dtype=np.float64)
    for k, (line, cells) in enumerate(rows):
        if len(cells) != width:
            raise ValueError(f"{str(path)!r}: line {line} has {len(cells)} columns, expected {width}")
        for j, cell in enumerate(cells):
            v = _number(cell)
            if v is None or not np.isfinite(v):
                what = "is not a number" if v is None else "is not finite"
                col = f"column {j + 1}" + (f" ({header[j]!r})" if header else "")
                raise ValueError(f"{str(path)!r}: line {line}, {col}: value {cell!r} {what}")
            out[k, j] = v
    return out


def _splits_from_npz(path: Path) -> dict[str, np.ndarray] | np.ndarray:
    with np.load(path, allow_pickle=False) as f:
        keys = set(f.files)
        val_key = "val" if "val" in keys else "validation" if "validation" in keys else None
        if {"train", "test"} <= keys and val_key:
            return {"train": f["train"], "val": f[val_key], "test": f["test"]}
        if "x" in keys:
            return f["x"]
        if len(keys) == 1:
            return f[next(iter(keys))]
    raise ValueError(
        f"{str(path)!r}: expected keys train/val/test, or a key 'x', or a single array; found {sorted(keys)}"
    )


def load_user_file(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    name: str | None = None,
) -> Dataset:
    """A `Dataset` from a user's ``.npy``, ``.npz`` or ``.csv`` file (see the module docs)."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"user data file {str(path)!r}: unsupported suffix {path.suffix!r}; use one of {SUFFIXES}")
    if not path.is_file():
        raise FileNotFoundError(f"user data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    name = name or path.stem
    try:
        if suffix == ".npy":
            raw = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            raw = _splits_from_npz(path)
        else:
            raw = _read_csv(path)
    except (OSError, EOFError) as exc:
        raise ValueError(f"user data file {str(path)!r} cannot be read: {exc}") from exc
    except ValueError as exc:
        if str(path) in str(exc):
            raise
        raise ValueError(f"user data file {str(path)!r} cannot be read: {exc}") from exc
    if isinstance(raw, dict):
        splits = {k: _check_array(np.asarray(v), f"{str(path)!r} [{k}]") for k, v in raw.items()}
        widths = {v.shape[1] for v in splits.values()}
        if len(widths) != 1:
            raise ValueError(
                f"{str(path)!r}: splits have different numbers of columns "
                f"{ {k: v.shape[1] for k, v in splits.items()} }"
            )
        if len(splits["train"]) < MIN_ROWS:
            raise ValueError(
                f"{str(path)!r}: the train split has {len(splits['train'])} rows; at least {MIN_ROWS} are needed"
            )
        for k in ("val", "test"):
            if len(splits[k]) < 1:
                raise ValueError(f"{str(path)!r}: the {k} split is empty")
    else:
        x = _check_array(np.asarray(raw), repr(str(path)))
        if len(x) < MIN_ROWS:
            raise ValueError(f"{str(path)!r}: {len(x)} rows; at least {MIN_ROWS} are needed")
        n_train, n_val, _ = fraction_split(len(x), fractions)
        order = split_rng(name, seed, "split").permutation(len(x))
        splits = {
            "train": x[order[:n_train]],
            "val": x[order[n_train : n_train + n_val]],
            "test": x[order[n_train + n_val :]],
        }
    dim = splits["train"].shape[1]
    return Dataset(
        name=name,
        kind="2d" if dim == 2 else "tabular",
        source=f"user file {path.name}",
        licence="user-provided",
        meta={"path": str(path), "given_splits": isinstance(raw, dict)},
        **splits,
    )
