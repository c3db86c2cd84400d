"""Training checkpoints inside a run folder, and finding the newest good one to resume from.

Layout: ``checkpoints/b{n}-s{step}/`` holds ``state.json`` and ``state.safetensors`` (the finished
blocks, the block in training with its optimiser and EMA, the random generator), and
``checkpoints/pool-b{n}.safetensors`` holds block n's pool (the data pushed through blocks < n).
A checkpoint folder is written under a temporary name and renamed, so it is whole or absent.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import (
    CheckpointError,
    flow_from_state,
    flow_meta,
    read_json,
    read_tensors,
    write_json,
    write_tensors,
)
from .config import FlowConfig, to_dict
from .flow import LocalFlow

__all__ = ["Checkpointer", "latest", "SavedRun"]

log = logging.getLogger(__name__)
FORMAT = "localfm-train-state"
_NAME = re.compile(r"^b(\d{2,})-s(\d{7,})$")


@dataclass
class SavedRun:
    flow: LocalFlow
    block: int
    step: int
    elapsed: float
    pool: Tensor | None
    generator_state: Tensor
    net_state: dict[str, Tensor] | None
    opt_state: dict | None
    ema_state: dict[str, Tensor] | None
    losses: list
    seconds: float


class Checkpointer:
    """Writes training checkpoints into ``run_dir/checkpoints``, keeping the newest few."""

    def __init__(self, run_dir: Path, config: FlowConfig) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.config = config

    def save(
        self, flow: LocalFlow, block: int, pool: Tensor, generator: torch.Generator, elapsed: float, state
    ) -> Path:
        """Checkpoint the run before block ``block`` (``state=None``) or inside it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        pool_name, pool_sha = None, None
        if block > 0:
            pool_name = f"pool-b{block:02d}.safetensors"
            pool_meta = self.dir / f"pool-b{block:02d}.json"
            if state is None or not pool_meta.exists():
                pool_sha = write_tensors(self.dir / pool_name, {"pool": pool})
                write_json(pool_meta, {"sha256": pool_sha})
            else:
                pool_sha = read_json(pool_meta)["sha256"]
        tensors = {f"flow.{k}": v for k, v in flow.state_dict().items()}
        tensors["rng"] = generator.get_state()
        meta = {
            "format": FORMAT,
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
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self._prune()
        return final

    def _prune(self) -> None:
        kept = _checkpoints(self.dir)[: self.config.train.keep_checkpoints]
        for d in _checkpoints(self.dir)[self.config.train.keep_checkpoints :]:
            shutil.rmtree(d, ignore_errors=True)
        oldest_block = min((int(_NAME.match(d.name).group(1)) for d in kept), default=0)
        for f in self.dir.glob("pool-b*.*"):
            m = re.match(r"pool-b(\d+)\.", f.name)
            if m and int(m.group(1)) < oldest_block:
                f.unlink(missing_ok=True)


def _checkpoints(folder: Path) -> list[Path]:
    """Checkpoint folders, newest first."""
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), int(m.group(2)), d) for d in folder.iterdir() if d.is_dir() and (m := _NAME.match(d.name))
    ]
    return [d for *_, d in sorted(found, reverse=True)]


def _load_one(path: Path, config: FlowConfig, shape, net_factory, device) -> SavedRun:
    meta = read_json(path / "state.json")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a localfm training checkpoint")
    if meta.get("config") != to_dict(config):
        saved, now = meta.get("config") or {}, to_dict(config)
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise ValueError(
            f"cannot resume from {path}: the config differs in {diff}; resume with the run's own "
            "config (config.yaml in the run folder) or start a new run"
        )
    tensors = read_tensors(path / "state.safetensors", meta.get("tensors_sha256"))
    flow_t = {k[5:]: v for k, v in tensors.items() if k.startswith("flow.")}
    flow = flow_from_state(meta["flow"], flow_t, path, net_factory=net_factory, map_location=device)
    if tuple(flow.event_shape) != tuple(shape[1:]):
        raise ValueError(
            f"cannot resume from {path}: it was trained on points of shape {flow.event_shape}, "
            f"the data given has {tuple(shape[1:])}"
        )
    pool = None
    if meta.get("pool_file"):
        pool = read_tensors(path.parent / meta["pool_file"], meta.get("pool_sha256"))["pool"]
        if pool.shape[0] != shape[0]:
            raise ValueError(f"cannot resume from {path}: its pool has {pool.shape[0]} points, the data {shape[0]}")
    bs = meta.get("block_state")
    net_state = opt_state = ema_state = None
    if bs is not None:
        net_state = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
        per_param: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                per_param.setdefault(int(i), {})[name] = v
        groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in bs["param_groups"]]
        opt_state = {"state": per_param, "param_groups": groups}
        ema_state = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")} if bs.get("ema") else None
    return SavedRun(
        flow,
        int(meta["block"]),
        int(meta["step"]),
        float(meta["elapsed"]),
        pool,
        tensors["rng"],
        net_state,
        opt_state,
        ema_state,
        [tuple(x) for x in (bs or {}).get("losses", [])],
        float((bs or {}).get("seconds", 0.0)),
    )


def latest(run_dir: Path, config: FlowConfig, shape, *, net_factory=None, device="cpu") -> SavedRun | None:
    """The newest checkpoint in ``run_dir`` that loads cleanly; damaged ones are skipped with a warning."""
    for path in _checkpoints(Path(run_dir) / "checkpoints"):
        try:
            return _load_one(path, config, shape, net_factory, device)
        except CheckpointError as err:
            log.warning("skipping damaged checkpoint %s: %s", path.name, err)
    return None


def restore_block_state(saved: SavedRun, cfg: FlowConfig, dim, seed, net_factory, device, dtype):
    """Rebuild the block in training (network, Adam, EMA) from a checkpoint."""
    from .training import BlockState, fresh_net

    net = fresh_net(dim, cfg, seed, net_factory).to(device, dtype)
    net.load_state_dict(saved.net_state)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    opt.load_state_dict(saved.opt_state)
    ema = {k: v.to(device, dtype) for k, v in saved.ema_state.items()} if saved.ema_state is not None else None
    return BlockState(net, opt, ema, saved.step, list(saved.losses), saved.seconds)
