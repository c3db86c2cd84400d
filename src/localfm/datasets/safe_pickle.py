"""Restricted unpickling: read data pickles without running code from the file.

A pickle names the callables that rebuild its objects; ``pickle.load`` imports and calls any of
them, so a crafted file can run arbitrary code. Here ``find_class`` answers only from an
allowlist:

- numpy's array reconstruction (``_reconstruct``, ``ndarray``, ``dtype``, ``scalar``,
  ``_frombuffer``), ``slice``, ``object`` and ``_codecs.encode(str, 'latin1')``: enough for
  CIFAR-10's python batches (dicts of lists and uint8 arrays);
- with ``pandas_stubs=True``, every ``pandas.*`` global is replaced by an inert `Stub` that
  only records its arguments and state, so a DataFrame pickle (MAF's
  ``gas/ethylene_CO.pickle``) becomes a tree of stubs and numpy arrays; `dataframe_arrays`
  then reads the column names and values out of it. No pandas code is imported or run.

Anything else raises ``pickle.UnpicklingError`` naming the refused global.
"""

from __future__ import annotations

import builtins
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric

_NUMPY = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _NUMPY[(_mod, "_reconstruct")] = _multiarray._reconstruct
    _NUMPY[(_mod, "scalar")] = _multiarray.scalar
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _NUMPY[(_mod, "_frombuffer")] = _numeric._frombuffer


def _encode(text: str, encoding: str = "utf-8") -> bytes:
    # protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1'); allow only that use
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refused _codecs.encode call")
    return text.encode("latin1")


class Stub:
    """Stand-in for a pandas object: records constructor arguments and pickled state."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any):
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"Stub({self.qualname})"


def _reconstructor(cls, base, state):  # copyreg._reconstructor, for stubs only
    if not (isinstance(cls, type) and issubclass(cls, Stub)):
        raise pickle.UnpicklingError(f"refused copyreg._reconstructor for {cls!r}")
    return cls.__new__(cls)


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, *, pandas_stubs: bool = False, encoding: str = "latin1"):
        super().__init__(file, encoding=encoding)
        self.pandas_stubs = pandas_stubs
        self._stubs: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY:
            return _NUMPY[(module, name)]
        if module in ("builtins", "__builtin__") and name in ("slice", "object"):
            return getattr(builtins, name)
        if (module, name) == ("_codecs", "encode"):
            return _encode
        if self.pandas_stubs:
            if module in ("copy_reg", "copyreg") and name == "_reconstructor":
                return _reconstructor
            if module == "pandas" or module.startswith("pandas."):
                key = f"{module}.{name}"
                if key not in self._stubs:
                    self._stubs[key] = type(name, (Stub,), {"qualname": key})
                return self._stubs[key]
        raise pickle.UnpicklingError(
            f"refused to load global {module}.{name}: not on the allowlist of this data loader"
        )

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


def restricted_load(path: str | Path, *, pandas_stubs: bool = False) -> Any:
    """Unpickle ``path`` with `RestrictedUnpickler` (Python 2 strings are read as latin1)."""
    with open(path, "rb") as f:
        data = f.read()
    return RestrictedUnpickler(io.BytesIO(data), pandas_stubs=pandas_stubs).load()


# ---------------------------------------------------------------------------------------------
# DataFrame pickles as stub trees


def _is(obj: Any, suffix: str) -> bool:
    return isinstance(obj, Stub) and obj.qualname.rsplit(".", 1)[-1] == suffix


def _index_values(index: Any) -> list:
    """Labels of a pickled pandas Index (``_new_Index(cls, {'data': ...})``)."""
    if isinstance(index, np.ndarray):
        return list(index)
    if isinstance(index, Stub):
        cls = index.args[0] if index.args else None
        d = index.args[1] if len(index.args) > 1 else index.state
        if isinstance(cls, type) and issubclass(cls, Stub) and cls.qualname.endswith("RangeIndex"):
            return list(range(d.get("start", 0), d["stop"], d.get("step", 1)))
        if isinstance(d, dict) and "data" in d:
            return _array_like(d["data"])
    raise ValueError(f"unsupported pandas index in pickle: {index!r}")


def _array_like(obj: Any) -> list:
    if isinstance(obj, np.ndarray):
        return list(obj)
    if isinstance(obj, Stub):  # extension array (e.g. StringArray): an ndarray in its state
        for part in _flatten(obj.state) + _flatten(obj.args):
            if isinstance(part, np.ndarray):
                return list(part)
    raise ValueError(f"unsupported array in pickle: {obj!r}")


def _flatten(obj: Any) -> list:
    if isinstance(obj, (tuple, list)):
        return [y for x in obj for y in _flatten(x)]
    if isinstance(obj, dict):
        return [y for x in obj.values() for y in _flatten(x)]
    return [obj]


def _placement(locs: Any) -> np.ndarray:
    if isinstance(locs, slice):
        return np.arange(locs.start or 0, locs.stop, locs.step or 1)
    if isinstance(locs, Stub):  # BlockPlacement
        return _placement((locs.args or (locs.state,))[0])
    return np.asarray(locs, dtype=np.int64).ravel()


def _manager_parts(mgr: Any) -> tuple[list, list]:
    """(axes, [(values, placement)]) of a pickled BlockManager, old or new layout."""
    if not isinstance(mgr, Stub):
        raise ValueError("the pickle holds no pandas BlockManager")
    state = mgr.state
    if isinstance(state, tuple) and len(state) == 4 and isinstance(state[3], dict):
        extra = state[3].get("0.14.1")  # pandas >= 0.14.1 __getstate__ layout
        if extra is not None:
            blocks = [(b["values"], _placement(b["mgr_locs"])) for b in extra["blocks"]]
            return list(extra["axes"]), blocks
    if len(mgr.args) >= 2:  # pandas >= 3: BlockManager(blocks, axes) via __reduce__
        blocks_in, axes = mgr.args[0], mgr.args[1]
        blocks = []
        for b in blocks_in:
            if not isinstance(b, Stub) or len(b.args) < 2:
                raise ValueError(f"unsupported pandas block in pickle: {b!r}")
            blocks.append((b.args[0], _placement(b.args[1])))
        return list(axes), blocks
    raise ValueError("unsupported pandas BlockManager layout in pickle")


def dataframe_arrays(obj: Any) -> tuple[list[str], np.ndarray]:
    """Column names and the (rows, columns) float64 values of a stubbed DataFrame pickle."""
    if not _is(obj, "DataFrame"):
        raise ValueError(f"the pickle holds {obj!r}, not a pandas DataFrame")
    state = obj.state if isinstance(obj.state, dict) else {}
    mgr = state.get("_mgr", state.get("_data"))
    axes, blocks = _manager_parts(mgr)
    columns = [c.decode("latin1") if isinstance(c, bytes) else str(c) for c in _index_values(axes[0])]
    n_rows = None
    values = None
    for block, place in blocks:
        block = np.asarray(block)
        if block.ndim == 1:
            block = block[None]
        if not np.issubdtype(block.dtype, np.number):
            raise ValueError(f"non-numeric columns {[columns[i] for i in place]} in the pickle")
        if values is None:
            n_rows = block.shape[1]
            values = np.full((n_rows, len(columns)), np.nan)
        values[:, place] = block.T
    if values is None:
        raise ValueError("the DataFrame pickle holds no data")
    return columns, values
