"""Saving and loading flows and training state: safetensors for tensors, JSON for the rest.

Nothing here unpickles: tensors come from safetensors, metadata from JSON. Every file is written
to a temporary name and renamed into place. Each JSON file carries the SHA-256 of its own content
(``json_sha256``, over the canonical JSON without that field) and the SHA-256 of the tensor file
beside it; loading verifies both, so a truncated, corrupt or edited file is refused with a
:class:`CheckpointError` that names it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
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
from torch import nn

from . import __version__
from .config import FlowConfig, from_dict, to_dict
from .flow import Block, LocalFlow, Standardizer
from .nets import build_net
from .ode import SolverConfig

__all__ = [
    "save",
    "load",
    "CheckpointError",
    "atomic_write_bytes",
    "write_json",
    "read_json",
    "write_tensors",
    "read_tensors",
]

log = logging.getLogger(__name__)
FORMAT = "localfm-flow"
FORMAT_VERSION = 1
CHECKSUM_KEY = "json_sha256"


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


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """The safetensors encoding of ``tensors`` (moved to the CPU, made contiguous)."""
    return st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write tensors as safetensors atomically; return the file's SHA-256."""
    data = tensor_bytes(tensors)
    atomic_write_bytes(path, data)
    return sha256(data)


def read_tensors(path: Path, expected_sha: str | None) -> dict[str, torch.Tensor]:
    """Read a safetensors file, checking its SHA-256 when one is recorded (never unpickles)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing tensor file {path}")
    data = path.read_bytes()
    if expected_sha is not None and sha256(data) != expected_sha:
        raise CheckpointError(f"{path} does not match the checksum recorded beside it (truncated, corrupt or modified)")
    try:
        return st_load(data)
    except (SafetensorError, Exception) as err:  # safetensors raises several types on bad bytes
        raise CheckpointError(f"{path} is not a valid safetensors file: {err}") from None


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write ``obj`` as JSON atomically, with the SHA-256 of its content under ``json_sha256``."""
    body = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    body[CHECKSUM_KEY] = sha256(_canonical(body))
    atomic_write_bytes(path, (json.dumps(body, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path, *, require_checksum: bool = False) -> dict[str, Any]:
    """Read a JSON object written by :func:`write_json`, verifying its ``json_sha256``.

    The checksum is checked whenever present; ``require_checksum=True`` also refuses a file
    without one (checkpoints always carry it).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing {path}")
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path} is not valid JSON (truncated or corrupt?): {err}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(obj).__name__}")
    recorded = obj.pop(CHECKSUM_KEY, None)
    if recorded is None:
        if require_checksum:
            raise CheckpointError(f"{path} has no {CHECKSUM_KEY}: it was not written by this localfm, or was edited")
    elif recorded != sha256(_canonical(obj)):
        raise CheckpointError(
            f"{path} was modified after it was written: its content does not match its {CHECKSUM_KEY}"
        )
    return obj


def check_header(meta: dict[str, Any], path: Path, fmt: str, version: int) -> str:
    """Refuse another format or version; return the recorded SHA-256 of the tensor file."""
    if meta.get("format") != fmt:
        raise CheckpointError(f"{path}: not a {fmt} checkpoint (format {meta.get('format')!r})")
    if meta.get("format_version") != version:
        raise CheckpointError(
            f"{path}: checkpoint format version {meta.get('format_version')!r}, this localfm "
            f"({__version__}) reads version {version}"
        )
    sha = meta.get("tensors_sha256")
    if not isinstance(sha, str):
        raise CheckpointError(f"{path}: no tensors_sha256 recorded for the tensor file")
    return sha


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
    the previous checkpoint intact (:func:`load` finds it if the swap itself was interrupted).
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
        for stale in path.parent.iterdir():  # this save's old copy, copies left by interrupted saves
            if stale.name.startswith(f".{path.name}.") and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _expect(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise CheckpointError(f"{path}: {what}")


def _interrupted_save(path: Path) -> Path | None:
    """The previous copy a save moved aside before it was killed mid-swap, if any."""
    if not path.name or not path.parent.is_dir():
        return None
    olds = [d for d in path.parent.iterdir() if d.name.startswith(f".{path.name}.old-") and (d / "flow.json").is_file()]
    return max(olds, key=lambda d: d.stat().st_mtime) if olds else None


def load(path: str | Path, *, net_factory=None, map_location: str | torch.device = "cpu") -> LocalFlow:
    """Rebuild a flow saved by :func:`save` from its folder, without executing anything from it.

    ``net_factory(dim_or_shape, config) -> nn.Module`` rebuilds custom networks; by default the
    MLP described by the saved config is built. A missing, truncated, edited or foreign
    checkpoint raises :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    if path.is_file() and path.name in ("flow.json", "model.safetensors"):
        path = path.parent
    if not path.is_dir() and (previous := _interrupted_save(path)) is not None:
        log.warning("%s is missing: a save was interrupted; loading the previous copy %s", path, previous)
        path = previous
    if not path.is_dir():
        raise CheckpointError(
            f"no localfm checkpoint at {path}: expected a folder with flow.json and model.safetensors"
        )
    meta = read_json(path / "flow.json", require_checksum=True)
    sha = check_header(meta, path / "flow.json", FORMAT, FORMAT_VERSION)
    tensors = read_tensors(path / "model.safetensors", sha)
    return flow_from_state(meta, tensors, path, net_factory=net_factory, map_location=map_location)


def _event_shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) not in (1, 3):
        raise ValueError(f"event_shape must be a list of 1 or 3 sizes, got {value!r}")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in value):
        raise ValueError(f"event_shape must hold positive integers, got {value!r}")
    return tuple(value)


def _step_size(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"every h must be a number > 0 or null (the free block), got {value!r}")
    return float(value)


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Names, shapes and values of saved tensors against the model the metadata describes."""
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
        _expect(v.is_floating_point(), path, f"tensor {k} has dtype {v.dtype}, expected floating point")
        _expect(bool(torch.isfinite(v).all()), path, f"tensor {k} holds non-finite values")


def flow_from_state(
    meta: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path, *, net_factory=None, map_location="cpu"
) -> LocalFlow:
    """Build a :class:`LocalFlow` from checked metadata and tensors; bad metadata is a CheckpointError."""
    try:
        config = from_dict(FlowConfig, meta["config"]) if meta.get("config") is not None else None
        solver = from_dict(SolverConfig, meta["solver"])
        event_shape = _event_shape(meta["event_shape"])
        _expect(isinstance(meta["h"], list), path, "'h' must be a list")
        hs = [_step_size(h) for h in meta["h"]]
        training_log = meta.get("training_log") or []
        _expect(isinstance(training_log, list), path, "'training_log' must be a list")
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path}: invalid metadata in flow.json: {err}") from None
    if config is None and net_factory is None:
        raise CheckpointError(f"{path}: the checkpoint has no config; pass net_factory= to rebuild its networks")
    dim = event_shape[0] if len(event_shape) == 1 else event_shape
    factory = net_factory or (lambda d, cfg: build_net(d, cfg.net))

    def build() -> LocalFlow:
        blocks = [Block(factory(dim, config), h) for h in hs]
        return LocalFlow(event_shape, blocks, Standardizer.identity(event_shape), solver, config)

    try:
        with torch.device("meta"):  # check shapes before allocating anything the metadata asks for
            nets = nn.ModuleList(Block(factory(dim, config), h) for h in hs)
        skeleton = {f"blocks.{k}": v for k, v in nets.state_dict().items()}
        skeleton.update({f"standardizer.{k}": torch.empty(event_shape, device="meta") for k in ("mean", "scale")})
    except Exception as err:
        if net_factory is None:
            raise CheckpointError(f"{path}: cannot rebuild the model its metadata describes: {err}") from None
        skeleton = None  # a custom factory that cannot build on the meta device: check after building
    if skeleton is not None:
        _check_tensors(path, tensors, skeleton)
    try:
        flow = build()
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: cannot rebuild the model its metadata describes: {err}") from None
    if skeleton is None or set(skeleton) != set(flow.state_dict()):
        _check_tensors(path, tensors, flow.state_dict())
    # Network weights take the saved dtype (float32 or float64) for every block alike.
    dtypes = {v.dtype for k, v in tensors.items() if k.startswith("blocks.")}
    if len(dtypes) == 1:
        flow.blocks.to(next(iter(dtypes)))
    flow.load_state_dict(tensors)
    flow.training_log = training_log
    return flow.to(map_location).eval()  # as fit returns it: dropout or batch-norm nets in inference mode
