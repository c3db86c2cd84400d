"""Atomic, checksummed ``.npz`` caches of built datasets.

A cache file holds the arrays plus ``sha256``: the SHA-256 of every array's name, dtype, shape
and bytes in sorted name order. Writing goes to a temporary file in the same folder followed
by ``os.replace``, so readers never see half a file; reading recomputes the checksum and treats
any mismatch or unreadable file as absent (with a logged warning), so the caller rebuilds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_npz_atomic(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` and their checksum to ``path`` atomically."""
    path = Path(path)
    if "sha256" in arrays:
        raise ValueError("'sha256' is a reserved array name")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(arrays, sha256=np.array(checksum(arrays)))
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a cache may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_npz_verified(path: str | os.PathLike) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file, or None if it is missing, unreadable or fails its checksum."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        stored = str(arrays.pop("sha256"))
    except Exception as exc:  # a damaged zip can raise many kinds of error
        logger.warning("cache %s is unreadable (%s); rebuilding it", path, exc)
        return None
    if checksum(arrays) != stored:
        logger.warning("cache %s fails its sha256 checksum; rebuilding it", path)
        return None
    return arrays
