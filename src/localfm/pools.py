"""Training pools on disk: memory-mapped ``.npy`` files, written in batches and renamed when whole.

A pool is the training data pushed through the blocks trained so far (block n trains on pool n).
Held on the training device, each pool costs as much memory as the data. With
``train.pool_storage: disk`` (or ``auto`` when a pool would take more than half of the free memory
of the device) ``fit`` writes every pool to a ``.npy`` file instead, one push batch at a time, and
trains from a memory map of it: the rows of a minibatch are read on the host and moved to the
device, so memory holds the page cache the system can spare, not the pool.

A pool file is written under a temporary name and renamed once complete and flushed, so a reader
finds it whole or not at all; its name carries its SHA-256 (``pool-b{n}-{sha}.npy``), so a
checkpoint refers to it instead of copying it, and a resumed run checks it before use. The files
are plain NumPy arrays (``numpy.load(path, mmap_mode="r")``); loading one never unpickles.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .checkpoint import CheckpointError
from .flow import row_chunks

__all__ = ["DiskPools", "PoolFile", "PoolWriter", "open_pool", "wants_disk", "free_memory"]

_CHUNK = 1 << 24  # bytes read at a time when hashing or checking a pool file
_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


@dataclass(frozen=True)
class PoolFile:
    """A finished pool on disk and the SHA-256 of the file."""

    path: Path
    sha256: str


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def free_memory(device: torch.device) -> float:
    """Bytes the device can still hold: free CUDA memory, or the host's available memory.

    Returns ``inf`` where the host does not say (the pool then stays in memory).
    """
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return float("inf")


def wants_disk(storage: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``train.pool_storage`` puts a pool of ``shape`` on disk (``auto``: over half the free memory)."""
    if storage != "auto":
        return storage == "disk"
    nbytes = float(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    return nbytes > 0.5 * free_memory(device)


class PoolWriter:
    """A pool being written: fill ``tensor`` (a writable memory map) in any order, then :meth:`finish`.

    Used as a context manager, the temporary file is removed if the block raises before ``finish``.
    """

    def __init__(self, folder: Path, block: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        if dtype not in _NP_DTYPES:
            raise ValueError(f"pools on disk hold float32 or float64, got {dtype}")
        self.folder, self.block = Path(folder), block
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".pool-b{block:02d}.", suffix=".npy.tmp", dir=self.folder)
        os.close(fd)
        self.tmp = Path(tmp)
        self._array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=_NP_DTYPES[dtype], shape=tuple(shape))
        self.tensor = torch.from_numpy(self._array)

    def finish(self) -> tuple[Tensor, PoolFile]:
        """Flush, name the file by its content, and reopen it read-only: ``(pool, file)``."""
        self._array.flush()
        self.tensor = self._array = None  # close the writable map before the rename
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        sha = file_sha256(self.tmp)
        final = self.folder / f"pool-b{self.block:02d}-{sha[:16]}.npy"
        os.replace(self.tmp, final)
        return open_pool(final), PoolFile(final, sha)

    def __enter__(self) -> PoolWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:
            self.tensor = self._array = None
            self.tmp.unlink(missing_ok=True)


def open_pool(path: Path, sha256: str | None = None) -> Tensor:
    """A pool file as a tensor backed by a copy-on-write memory map (the file never changes).

    With ``sha256``, the file is checked against it and every value must be finite; damage raises
    :class:`~localfm.checkpoint.CheckpointError`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing pool file {path}")
    if sha256 is not None and file_sha256(path) != sha256:
        raise CheckpointError(f"{path} does not match the checksum recorded for it (truncated, corrupt or modified)")
    try:
        array = np.load(path, mmap_mode="c", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise CheckpointError(f"{path} is not a NumPy array file: {err}") from None
    if array.dtype not in (np.float32, np.float64) or array.ndim < 2:
        raise CheckpointError(
            f"{path}: a pool is a float32 or float64 array of points, got {array.dtype} {array.shape}"
        )
    pool = torch.from_numpy(array)
    if sha256 is not None:
        for _, part in row_chunks(pool, _CHUNK):
            if not bool(torch.isfinite(part).all()):
                raise CheckpointError(f"{path}: the pool holds non-finite values")
    return pool


class DiskPools:
    """The pools of one ``fit`` on disk: in ``folder`` (the run's checkpoint folder, where
    checkpoints refer to them), or in a temporary folder removed by :meth:`close`."""

    def __init__(self, folder: Path | None) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="localfm-pools-") if folder is None else None
        self.folder = Path(self._tmp.name if folder is None else folder)

    def write(self, block: int, shape: tuple[int, ...], dtype: torch.dtype, fill) -> tuple[Tensor, PoolFile]:
        """Pool ``block``: ``fill(out=...)`` writes every row of the memory-mapped ``out``."""
        with PoolWriter(self.folder, block, shape, dtype) as writer:
            fill(out=writer.tensor)
            return writer.finish()

    def standardized(self, standardize, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, PoolFile]:
        """Pool 0, the standardised data, written in batches from ``x`` wherever it is."""
        device = standardize.mean.device

        def fill(out: Tensor) -> None:
            for i, part in row_chunks(x, _CHUNK):
                out[i : i + len(part)] = standardize(part.to(device, dtype)).to(out.device)

        return self.write(0, tuple(x.shape), dtype, fill)

    def adopt(self, pool: Tensor, file: PoolFile | None, block: int) -> tuple[Tensor, PoolFile]:
        """A resumed run's pool: its own file when it is already here, else a copy written here."""
        if file is not None and file.path.parent.resolve() == self.folder.resolve():
            return pool, file

        def fill(out: Tensor) -> None:
            for i, part in row_chunks(pool, _CHUNK):
                out[i : i + len(part)] = part.to(out.device)

        return self.write(block, tuple(pool.shape), pool.dtype, fill)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
