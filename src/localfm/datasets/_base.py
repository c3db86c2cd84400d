"""Shared types and helpers of the datasets subpackage.

`Dataset` holds three fixed splits; `DatasetInfo` is the registry's description of a dataset
before it is loaded. Seeds: every random stream is a `numpy.random.SeedSequence` built from
(user seed, a stable hash of the dataset name, a stream number), so each split has its own
stream and loading twice gives identical arrays.
"""

from __future__ import annotations

import importlib
import logging
import os
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any, NamedTuple

import numpy as np

logger = logging.getLogger(__name__)

KINDS = ("2d", "tabular", "image")
SPLITS = ("train", "val", "test")

#: stream numbers of `split_rng`
STREAMS = {"train": 0, "val": 1, "test": 2, "entropy": 3, "split": 4}

DATA_EXTRA = "pip install 'localfm[data]'"


@dataclass(frozen=True)
class SplitLabels:
    """Integer class labels of the three splits (images only)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


class EntropyEstimate(NamedTuple):
    """Monte Carlo estimate of the differential entropy ``H = -E log p(x)`` in nats."""

    value: float
    stderr: float


@dataclass(frozen=True, eq=False)
class Dataset:
    """Three fixed splits of one dataset, in float32.

    Shapes: ``train, val, test`` are ``(N, d)`` for kinds "2d" and "tabular" and
    ``(N, C, H, W)`` with values in [-1, 1] for kind "image".
    ``log_prob(x)`` (``x``: ``(n, d)``) is the true log-density in data units (float64,
    shape ``(n,)``) where it is known; ``sampler(n, rng)`` draws fresh samples from it.
    """

    name: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    kind: str
    source: str
    licence: str
    log_prob: Callable[[np.ndarray], np.ndarray] | None = None
    sampler: Callable[[int, np.random.Generator], np.ndarray] | None = None
    labels: SplitLabels | None = None
    image_shape: tuple[int, int, int] | None = None
    #: number of pixel levels of the raw images (256 for 8-bit data), None if not quantised
    levels: int | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Dataset.kind must be one of {KINDS}, got {self.kind!r}")
        for split in SPLITS:
            x = getattr(self, split)
            if not isinstance(x, np.ndarray) or x.dtype != np.float32:
                raise TypeError(f"Dataset.{split} must be a float32 numpy array")
            expected_ndim = 4 if self.kind == "image" else 2
            if x.ndim != expected_ndim:
                raise ValueError(
                    f"Dataset.{split} of kind {self.kind!r} must be {expected_ndim}-D, got shape {x.shape}"
                )
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    @property
    def dim(self) -> int:
        """Number of dimensions of one data point (C*H*W for images)."""
        return int(np.prod(self.train.shape[1:]))

    @property
    def sizes(self) -> tuple[int, int, int]:
        return (len(self.train), len(self.val), len(self.test))

    def split(self, name: str) -> np.ndarray:
        """The split called ``name`` ("train", "val" or "test")."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, kind={self.kind!r}, dim={self.dim}, "
            f"sizes={self.sizes}, exact_log_prob={self.log_prob is not None})"
        )


@dataclass(frozen=True)
class DatasetInfo:
    """What the registry knows about a dataset before loading it."""

    name: str
    dim: int | None
    kind: str
    sizes: tuple[int, int, int] | None
    source: str
    licence: str
    needs: str = ""
    description: str = ""

    HEADER = ("name", "kind", "dim", "train/val/test", "needs", "source")

    def row(self) -> tuple[str, ...]:
        """Cells of one table row, in the order of `DatasetInfo.HEADER`."""
        sizes = "/".join(f"{n:,}" for n in self.sizes) if self.sizes else "on load"
        dim = str(self.dim) if self.dim is not None else "on load"
        return (self.name, self.kind, dim, sizes, self.needs or "-", self.source)


def name_hash(name: str) -> int:
    """A stable 32-bit hash of a dataset name (Python's hash() is salted per process)."""
    return zlib.crc32(name.encode("utf-8"))


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def split_rng(name: str, seed: int, stream: str) -> np.random.Generator:
    """The random generator of one stream ("train", "val", ...) of dataset ``name``."""
    ss = np.random.SeedSequence([check_seed(seed), name_hash(name), STREAMS[stream]])
    return np.random.default_rng(ss)


def check_sizes(sizes: tuple[int, int, int] | None, default: tuple[int, int, int]):
    if sizes is None:
        return default
    if (
        not isinstance(sizes, (tuple, list))
        or len(sizes) != 3
        or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) for n in sizes)
        or any(n < 1 for n in sizes)
    ):
        raise ValueError(f"sizes must be three positive ints (train, val, test), got {sizes!r}")
    return tuple(int(n) for n in sizes)


def require(module: str, what: str) -> ModuleType:
    """Import an optional dependency, or raise ImportError saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{what} needs the optional package {module.split('.')[0]!r}: {DATA_EXTRA}") from exc


def data_home(cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache folder: ``cache_dir``, else ``$LOCALFM_DATA``, else ``~/.cache/localfm``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LOCALFM_DATA")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/localfm").expanduser()


def fraction_split(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """Split sizes for ``n`` rows; val and test get at least one row each."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions!r}")
    n_val = max(1, int(round(fractions[1] * n)))
    n_test = max(1, int(round(fractions[2] * n)))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"{n} rows are too few for a train/val/test split")
    return n_train, n_val, n_test


def maf_split(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MAF's split: the last 10 % is test, then the last 10 % of the rest is validation."""
    n_test = int(0.1 * data.shape[0])
    test = data[-n_test:]
    rest = data[:-n_test]
    n_val = int(0.1 * rest.shape[0])
    return rest[:-n_val], rest[-n_val:], test
