"""Training checkpoints inside a run folder, and finding the newest good one to resume from.

Layout: ``checkpoints/b{n}-s{step}/`` holds ``state.json`` and ``state.safetensors`` (the finished
blocks, the block in training with its optimiser and EMA, the random generator), and
``checkpoints/pool-b{n}-{sha}.safetensors`` holds block n's pool (the data pushed through blocks
< n), named by its content so that a pool file never changes once a checkpoint refers to it; a pool
kept on disk (``train.pool_storage``) is its own ``pool-b{n}-{sha}.npy`` there, referred to, not copied.
A checkpoint folder is written under a temporary name and renamed, so it is whole or absent;
``state.json`` records the SHA-256 of itself, of ``state.safetensors`` and of the pool file.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    check_header,
    flow_from_state,
    flow_meta,
    read_json,
    read_tensors,
    sha256,
    tensor_bytes,
    write_json,
    write_tensors,
)
from .config import FlowConfig, to_dict
from .flow import LocalFlow
from .pools import PoolFile, open_pool
from .training import BlockState, fresh_net, make_optimizer

__all__ = ["Checkpointer", "latest", "SavedRun", "RESUMABLE_CHANGES"]

log = logging.getLogger(__name__)
FORMAT = "localfm-train-state"
FORMAT_VERSION = 1
_NAME = re.compile(r"^b(\d{2,})-s(\d{7,})$")
_POOL = re.compile(r"^pool-b(\d{2,})-[0-9a-f]{16}\.(safetensors|npy)$")

#: Settings that may differ when resuming (the cure for a diverged run); any other change is refused.
RESUMABLE_CHANGES = (
    "device",
    "train.lr",
    "train.grad_clip",
    "train.warmup",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.push_batch_size",
    "train.pool_storage",
)


@dataclass
class SavedRun:
    """A training checkpoint, ready to continue: ``block_state`` is the block in training, if any."""

    path: Path
    flow: LocalFlow
    block: int
    step: int
    elapsed: float
    pool: Tensor | None
    generator_state: Tensor
    block_state: BlockState | None
    pool_file: PoolFile | None = None  # the pool's .npy file when it was kept on disk


class Checkpointer:
    """Writes training checkpoints into ``run_dir/checkpoints``, keeping the newest few.

    ``resumed_from`` is the checkpoint the run continues from (``None`` for a new run, which
    refuses a folder that already holds checkpoints rather than mixing two runs).
    """

    def __init__(self, run_dir: Path, config: FlowConfig, resumed_from: SavedRun | None = None) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.config = config
        self._pool: tuple[int, Tensor, str, str] | None = None  # (block, pool, file name, sha)
        self._in_use: str | None = None  # the pool file training reads now: never pruned
        found = _checkpoints(self.dir)
        if resumed_from is None and found:
            raise ValueError(
                f"{self.dir} already holds checkpoints of a run: pass resume=True (--resume) to continue it, "
                "or train into a new folder"
            )
        if self.dir.is_dir():
            for stale in self.dir.iterdir():  # temporary files of writes a kill interrupted
                if stale.name.startswith("."):
                    _remove(stale)
        if resumed_from is not None:
            # Newer checkpoints were skipped as damaged; keep them for inspection, out of the way.
            for d in found[: found.index(resumed_from.path)] if resumed_from.path in found else []:
                aside = d.with_name(f"damaged-{d.name}")
                if aside.exists():
                    _remove(aside)
                os.replace(d, aside)
                log.warning("moved the damaged checkpoint %s aside to %s", d.name, aside.name)
        self.last: Path | None = resumed_from.path if resumed_from is not None else None

    def _pool_file(self, block: int, pool: Tensor, file: PoolFile | None) -> tuple[str, str]:
        """Write block ``block``'s pool once (content-named), or find it already on disk."""
        if file is not None and file.path.parent.resolve() == self.dir.resolve():
            return file.path.name, file.sha256
        if self._pool is not None and self._pool[0] == block and self._pool[1] is pool:
            return self._pool[2], self._pool[3]
        data = tensor_bytes({"pool": pool})
        sha = sha256(data)
        name = f"pool-b{block:02d}-{sha[:16]}.safetensors"
        target = self.dir / name
        if not (target.is_file() and sha256(target.read_bytes()) == sha):
            atomic_write_bytes(target, data)
        self._pool = (block, pool, name, sha)
        return name, sha

    def save(
        self,
        flow: LocalFlow,
        block: int,
        pool: Tensor,
        generator: torch.Generator,
        elapsed: float,
        state,
        pool_file: PoolFile | None = None,
    ) -> Path:
        """Checkpoint the run before block ``block`` (``state=None``) or inside it.

        ``pool_file``: the pool's file when it is kept on disk in this folder (referred to, not copied).
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        self._in_use = pool_file.path.name if pool_file is not None else None
        pool_name, pool_sha = self._pool_file(block, pool, pool_file) if block > 0 else (None, None)
        tensors = {f"flow.{k}": v for k, v in flow.state_dict().items()}
        tensors["rng"] = generator.get_state()
        meta: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "block": block,
            "step": state.step if state else 0,
            "elapsed": elapsed,
            "flow": flow_meta(flow),
            "config": to_dict(self.config),
            "pool_file": pool_name,
            "pool_sha256": pool_sha,
            "block_state": None,
        }
        if state is not None:
            tensors.update({f"net.{k}": v for k, v in state.net.state_dict().items()})
            opt = state.optimizer.state_dict()
            for i, st in opt["state"].items():
                tensors.update({f"opt.{i}.{k}": v if torch.is_tensor(v) else torch.tensor(v) for k, v in st.items()})
            if state.ema is not None:
                tensors.update({f"ema.{k}": v for k, v in state.ema.items()})
            meta["block_state"] = {
                "param_groups": opt["param_groups"],
                "losses": state.losses,
                "seconds": state.seconds,
                "ema": state.ema is not None,
            }
        name = f"b{block:02d}-s{meta['step']:07d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.dir))
        try:
            meta["tensors_sha256"] = write_tensors(tmp / "state.safetensors", tensors)
            write_json(tmp / "state.json", meta)
            final = self.dir / name
            if final.exists():  # the same point reached again after a resume
                _remove(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self.last = final
        self._prune()
        return final

    def _prune(self) -> None:
        """Keep the newest ``keep_checkpoints`` checkpoints and every pool file they refer to."""
        found = _checkpoints(self.dir)
        kept = found[: self.config.train.keep_checkpoints]
        for d in found[len(kept) :]:
            _remove(d)
        referenced = set()
        for d in kept:
            try:
                referenced.add(read_json(d / "state.json").get("pool_file"))
            except CheckpointError:
                return  # cannot tell which pool a kept checkpoint needs: keep them all
        for f in self.dir.iterdir():
            if _POOL.match(f.name) and f.name not in referenced and f.name != self._in_use:
                f.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    """Delete a file or folder; a folder is first renamed aside so it never appears half-deleted."""
    if path.is_dir():
        aside = path.with_name(f".{path.name}.deleting")
        shutil.rmtree(aside, ignore_errors=True)  # what an earlier interrupted deletion left
        os.replace(path, aside)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _checkpoints(folder: Path) -> list[Path]:
    """Checkpoint folders, newest first."""
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), int(m.group(2)), d) for d in folder.iterdir() if d.is_dir() and (m := _NAME.match(d.name))
    ]
    return [d for *_, d in sorted(found, reverse=True)]


def _check_config(path: Path, saved: Any, config: FlowConfig) -> None:
    """Refuse to resume under a config that changes the model or the data (ValueError)."""
    now = to_dict(config)
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: state.json holds no config")

    def changed(a: Any, b: Any, prefix: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [c for k in sorted(set(a) | set(b)) for c in changed(a.get(k), b.get(k), f"{prefix}{k}.")]
        return [] if a == b else [prefix[:-1]]

    diff = [k for k in changed(saved, now, "") if k not in RESUMABLE_CHANGES]
    if diff:
        raise ValueError(
            f"cannot resume from {path}: the config differs in {diff}; resume with the run's own config "
            f"(config.yaml in the run folder; only {', '.join(RESUMABLE_CHANGES)} may change) or start a new run"
        )


def _load_one(path: Path, config: FlowConfig, shape, net_factory, device, dtype) -> SavedRun:
    """Load and check one checkpoint. Damage is a CheckpointError; a mismatch with the run, a ValueError."""
    meta = read_json(path / "state.json", require_checksum=True)
    sha = check_header(meta, path / "state.json", FORMAT, FORMAT_VERSION)
    _check_config(path, meta.get("config"), config)
    tensors = read_tensors(path / "state.safetensors", sha)
    try:
        saved = _parse(path, meta, tensors, config, net_factory, device, dtype)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path}: invalid training state ({type(err).__name__}: {err})") from None
    if tuple(saved.flow.event_shape) != tuple(shape[1:]):
        raise ValueError(
            f"cannot resume from {path}: it was trained on points of shape {saved.flow.event_shape}, "
            f"the data given has {tuple(shape[1:])}"
        )
    rows = shape[0] if config.train.push_points is None else min(shape[0], config.train.push_points)
    if saved.pool is not None and tuple(saved.pool.shape) != (rows, *shape[1:]):
        raise ValueError(
            f"cannot resume from {path}: its pool holds {tuple(saved.pool.shape)} points, "
            f"the data and train.push_points call for {(rows, *shape[1:])}"
        )
    return saved


def _expect(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise CheckpointError(f"{path}: {what}")


def _parse(path: Path, meta: dict, tensors: dict[str, Tensor], cfg: FlowConfig, net_factory, device, dtype):
    n_blocks = len(cfg.blocks.steps())
    block, step, elapsed = meta["block"], meta["step"], meta["elapsed"]
    _expect(type(block) is int and 0 <= block <= n_blocks, path, f"block {block!r} is not in 0..{n_blocks}")
    _expect(type(step) is int and step >= 0, path, f"step {step!r} is not a count of steps")
    _expect(isinstance(elapsed, (int, float)) and math.isfinite(elapsed), path, f"elapsed {elapsed!r} is not a time")
    flow_t = {k[5:]: v for k, v in tensors.items() if k.startswith("flow.")}
    flow = flow_from_state(meta["flow"], flow_t, path, net_factory=net_factory, map_location=device)
    _expect(len(flow) == block, path, f"holds {len(flow)} finished blocks, expected {block}")
    flow.config = cfg  # equal up to RESUMABLE_CHANGES, which the run continues under
    rng = tensors["rng"]
    _expect(rng.dtype == torch.uint8 and rng.dim() == 1, path, "the random generator state is malformed")
    pool, pool_file = None, None
    if block > 0:
        name = meta["pool_file"]
        _expect(isinstance(name, str) and bool(_POOL.match(name)), path, f"pool_file {name!r} is not a pool file")
        _expect(isinstance(meta["pool_sha256"], str), path, "no pool_sha256 recorded")
        if name.endswith(".npy"):  # kept on disk: memory-mapped, checked against its checksum
            pool = open_pool(path.parent / name, meta["pool_sha256"])
            pool_file = PoolFile(path.parent / name, meta["pool_sha256"])
        else:
            pool_t = read_tensors(path.parent / name, meta["pool_sha256"])
            pool = pool_t.get("pool")
            _expect(pool is not None and set(pool_t) == {"pool"}, path.parent / name, "holds no pool tensor")
            good = pool.is_floating_point() and bool(torch.isfinite(pool).all())
            _expect(good, path.parent / name, "bad pool values")
    bs = meta["block_state"]
    state = None
    if bs is not None:
        steps = cfg.train.sequential_steps(cfg.blocks.steps())
        _expect(block < n_blocks and step < steps[block], path, "no block left to train")
        state = _restore_block(path, bs, tensors, cfg, flow, net_factory, device, dtype, step)
    return SavedRun(path, flow, block, step, float(elapsed), pool, rng, state, pool_file)


def _restore_block(path, bs: dict, tensors, cfg: FlowConfig, flow, net_factory, device, dtype, step) -> BlockState:
    """Rebuild the block in training (network, Adam, EMA) exactly as it was saved."""
    dim = flow.event_shape[0] if len(flow.event_shape) == 1 else flow.event_shape
    net = fresh_net(dim, cfg, 0, net_factory).to(device, dtype)  # initial values are overwritten below
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    _expect(all(torch.isfinite(p).all() for p in net.parameters()), path, "the network in training is not finite")
    opt = make_optimizer(net, cfg.train)
    per_param: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            per_param.setdefault(int(i), {})[name] = v
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in bs["param_groups"]]
    opt.load_state_dict({"state": per_param, "param_groups": groups})
    for p in net.parameters():
        for k in ("exp_avg", "exp_avg_sq"):
            v = opt.state[p].get(k) if p in opt.state else None
            _expect(v is None or v.shape == p.shape, path, f"optimiser state {k} does not fit its parameter")
    ema = None
    if bs["ema"]:
        ema = {k[4:]: v.to(device, dtype) for k, v in tensors.items() if k.startswith("ema.")}
        named = dict(net.named_parameters())
        _expect(set(ema) == set(named) and all(ema[k].shape == named[k].shape for k in ema), path, "EMA does not fit")
    losses = [(int(s), float(v)) for s, v in bs["losses"]]
    return BlockState(net, opt, ema, step, losses, float(bs["seconds"]))


def latest(
    run_dir: Path, config: FlowConfig, shape, *, net_factory=None, device="cpu", dtype=torch.float32
) -> SavedRun | None:
    """The newest checkpoint in ``run_dir`` that loads cleanly; damaged ones are skipped with a warning.

    Returns ``None`` for a folder without checkpoints. Raises :class:`CheckpointError` when there
    are checkpoints but none is usable (nothing is deleted; start a new run or fix the folder), and
    ``ValueError`` when the config or the data differ from the run's.
    """
    found = _checkpoints(Path(run_dir) / "checkpoints")
    errors = []
    for path in found:
        try:
            return _load_one(path, config, shape, net_factory, device, dtype)
        except CheckpointError as err:
            log.warning("skipping damaged checkpoint %s: %s", path.name, err)
            errors.append(f"{path.name}: {err}")
    if found:
        raise CheckpointError(
            f"no usable checkpoint in {Path(run_dir) / 'checkpoints'}: all {len(found)} are damaged "
            f"({'; '.join(errors[:3])}); move the folder away to start the run over"
        )
    return None
