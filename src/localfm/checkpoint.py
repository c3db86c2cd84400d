"""Saving and loading flows and training state: safetensors for tensors, JSON for the rest.

Nothing here unpickles. Every file is written to a temporary name and renamed into place, and
the JSON records the SHA-256 of the tensor file, which loading verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import __version__
from .config import FlowConfig, from_dict, to_dict
from .flow import Block, LocalFlow, Standardizer
from .nets import build_net
from .ode import SolverConfig

__all__ = ["save", "load", "CheckpointError", "atomic_write_bytes", "write_tensors", "read_tensors"]

FORMAT = "localfm-flow"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint or state file is missing, corrupt, tampered with or of another format."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write tensors as safetensors atomically; return the file's SHA-256."""
    data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    atomic_write_bytes(path, data)
    return sha256(data)


def read_tensors(path: Path, expected_sha: str | None) -> dict[str, torch.Tensor]:
    """Read a safetensors file, checking its SHA-256 when one is recorded."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing tensor file {path}")
    data = path.read_bytes()
    if expected_sha is not None and sha256(data) != expected_sha:
        raise CheckpointError(f"{path} does not match the checksum recorded beside it (corrupt or modified)")
    try:
        return st_load(data)
    except (SafetensorError, Exception) as err:  # safetensors raises several types on bad bytes
        raise CheckpointError(f"{path} is not a valid safetensors file: {err}") from None


def write_json(path: Path, obj: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing {path}")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return obj


def flow_tensors(flow: LocalFlow) -> dict[str, torch.Tensor]:
    return {k: v for k, v in flow.state_dict().items()}


def flow_meta(flow: LocalFlow) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "localfm_version": __version__,
        "event_shape": list(flow.event_shape),
        "h": [b.h for b in flow.blocks],
        "solver": to_dict(flow.solver),
        "config": to_dict(flow.config) if flow.config is not None else None,
        "training_log": flow.training_log,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def save(flow: LocalFlow, path: str | Path) -> Path:
    """Save ``flow`` into the folder ``path`` (``model.safetensors`` + ``flow.json``).

    The folder is assembled under a temporary name and swapped in, so an interrupted save leaves
    the previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        meta = flow_meta(flow)
        meta["tensors_sha256"] = write_tensors(tmp / "model.safetensors", flow_tensors(flow))
        write_json(tmp / "flow.json", meta)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _expect(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise CheckpointError(f"{path}: {what}")


def load(path: str | Path, *, net_factory=None, map_location: str | torch.device = "cpu") -> LocalFlow:
    """Rebuild a flow saved by :func:`save` from its folder, without executing anything from it.

    ``net_factory(dim_or_shape, config) -> nn.Module`` rebuilds custom networks; by default the
    MLP described by the saved config is built.
    """
    path = Path(path)
    if path.is_file() and path.name in ("flow.json", "model.safetensors"):
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(
            f"no localfm checkpoint at {path}: expected a folder with flow.json and model.safetensors"
        )
    meta = read_json(path / "flow.json")
    _expect(meta.get("format") == FORMAT, path, f"not a localfm checkpoint (format {meta.get('format')!r})")
    _expect(
        meta.get("format_version") == FORMAT_VERSION,
        path,
        f"checkpoint format version {meta.get('format_version')!r}, this localfm reads {FORMAT_VERSION}",
    )
    tensors = read_tensors(path / "model.safetensors", meta.get("tensors_sha256"))
    return flow_from_state(meta, tensors, path, net_factory=net_factory, map_location=map_location)


def flow_from_state(
    meta: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path, *, net_factory=None, map_location="cpu"
) -> LocalFlow:
    try:
        config = from_dict(FlowConfig, meta["config"]) if meta.get("config") is not None else None
        solver = from_dict(SolverConfig, meta["solver"])
        event_shape = tuple(int(s) for s in meta["event_shape"])
        hs = meta["h"]
        _expect(isinstance(hs, list), path, "'h' must be a list")
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid metadata in flow.json: {err}") from None
    if config is None and net_factory is None:
        raise CheckpointError(f"{path}: the checkpoint has no config; pass net_factory= to rebuild its networks")
    dim = event_shape[0] if len(event_shape) == 1 else event_shape
    factory = net_factory or (lambda d, cfg: build_net(d, cfg.net))
    blocks = [Block(factory(dim, config), None if h is None else float(h)) for h in hs]
    std = Standardizer.identity(event_shape)
    flow = LocalFlow(event_shape, blocks, std, solver, config)
    expected = flow.state_dict()
    _expect(
        set(tensors) == set(expected),
        path,
        f"tensor names do not match the model the config describes "
        f"(missing {sorted(set(expected) - set(tensors))[:3]}, unexpected {sorted(set(tensors) - set(expected))[:3]})",
    )
    for k, v in tensors.items():
        _expect(
            v.shape == expected[k].shape,
            path,
            f"tensor {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}",
        )
    # Network weights take the saved dtype (float32 or float64) for every block alike.
    dtypes = {v.dtype for k, v in tensors.items() if k.startswith("blocks.")}
    if len(dtypes) == 1:
        flow.blocks.to(next(iter(dtypes)))
    flow.load_state_dict(tensors)
    flow.training_log = meta.get("training_log") or []
    return flow.to(map_location)
