"""The policy: observation history in, a chunk of future actions out, through a conditional flow.

A saved policy is a folder: ``policy.json`` (the resolved :class:`PolicyConfig`, the tasks, the
dimensions, the demonstration seeds, the training record; with its own SHA-256),
``normalizer.safetensors`` (observation and action statistics) and ``flow/`` (the
:class:`~localfm.flow.LocalFlow`, or ``distilled/`` for a distilled one). Loading never unpickles.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import __version__
from ..checkpoint import CheckpointError, check_header, read_json, read_tensors, write_json, write_tensors
from ..config import FlowConfig, from_dict, load_config, to_dict
from ..flow import LocalFlow

__all__ = ["PolicyConfig", "Normalizer", "Policy", "load_policy"]

FORMAT = "localfm-policy"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PolicyConfig:
    """Settings of a policy and of its training.

    ``demos``: demonstration files (``localfm policy collect``); several files (tasks) make a
    task-conditioned multi-task policy. ``max_demos``: use the first that many episodes of each
    task (all when null). ``obs_horizon`` T_o, ``pred_horizon`` T_p, ``action_horizon`` T_a
    (actions executed per plan, T_a <= T_p). ``guidance``: classifier-free guidance weight at
    sampling (needs ``flow.train.context_dropout > 0``). ``flow``: the conditional flow;
    ``flow.net.context_dim`` is filled in (T_o * obs_dim, plus the number of tasks).
    ``time_budget``: training seconds (null: ``flow.train.steps`` decide).
    """

    demos: tuple[str, ...] = ()
    max_demos: int | None = None
    obs_horizon: int = 2
    pred_horizon: int = 16
    action_horizon: int = 8
    guidance: float = 0.0
    time_budget: float | None = None
    seed: int = 0
    flow: FlowConfig = field(default_factory=FlowConfig)

    def __post_init__(self) -> None:
        for name in ("obs_horizon", "pred_horizon", "action_horizon"):
            if getattr(self, name) < 1:
                raise ValueError(f"policy.{name} must be >= 1, got {getattr(self, name)}")
        if self.action_horizon > self.pred_horizon:
            raise ValueError(
                f"action_horizon ({self.action_horizon}) cannot exceed pred_horizon ({self.pred_horizon}): "
                "a plan executes at most the actions it predicts"
            )
        if self.max_demos is not None and self.max_demos < 1:
            raise ValueError(f"max_demos must be >= 1 or null (all), got {self.max_demos}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"time_budget must be > 0 seconds or null, got {self.time_budget}")
        if not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise ValueError(f"guidance must be a weight >= 0, got {self.guidance}")

    def replace(self, **changes: Any) -> PolicyConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def load(cls, source: str | Path | dict | PolicyConfig, overrides=()) -> PolicyConfig:
        """From a YAML file, a dict or a config, with ``--set key=value`` overrides; unknown keys rejected."""
        if isinstance(source, PolicyConfig) and not overrides:
            return source
        import copy

        import yaml

        from ..config import set_option

        if isinstance(source, PolicyConfig):
            data = to_dict(source)
        elif isinstance(source, dict):
            data = copy.deepcopy(source)
        else:
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"policy config file not found: {path}")
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as err:
                raise ValueError(f"policy config {path} is not valid YAML: {err}") from None
            if not isinstance(data, dict):
                raise ValueError(f"policy config {path} must hold a mapping of settings")
        for assignment in overrides:
            set_option(data, assignment)
        if isinstance(data.get("demos"), str):
            data["demos"] = [data["demos"]]
        data["flow"] = to_dict(load_config(data.get("flow") or {}))
        return from_dict(cls, data, "policy")


class Normalizer:
    """``u = (x - mean) / scale`` per coordinate; constant coordinates keep scale 1."""

    def __init__(self, mean, scale) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
        self.scale = torch.as_tensor(scale, dtype=torch.float64).flatten()
        if self.mean.shape != self.scale.shape or not bool((self.scale > 0).all()):
            raise ValueError("normalizer: mean and scale must have the same shape and scale must be > 0")

    @classmethod
    def fit(cls, x) -> Normalizer:
        x = torch.as_tensor(np.asarray(x), dtype=torch.float64).reshape(-1, np.shape(x)[-1])
        scale = x.std(0) if x.shape[0] > 1 else torch.ones(x.shape[1], dtype=torch.float64)
        return cls(x.mean(0), torch.where(scale > 1e-6, scale, torch.ones_like(scale)))

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x)) / self.scale.to(x)

    def inverse(self, u: Tensor) -> Tensor:
        return u * self.scale.to(u) + self.mean.to(u)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Normalizer)
            and torch.equal(self.mean, other.mean)
            and torch.equal(self.scale, other.scale)
        )


class Policy:
    """Observation history (B, T_o, obs_dim) -> action chunk (B, T_p, action_dim), in env units.

    ``flow`` generates normalised, flattened chunks given the context ``[normalised history,
    one-hot task]``; it is a :class:`LocalFlow` or a :class:`~localfm.distill.DistilledFlow`.
    ``demo_seeds`` maps each task to the reset seeds its demonstrations used (evaluation avoids them).
    """

    def __init__(
        self,
        config: PolicyConfig,
        flow,
        obs_norm: Normalizer,
        action_norm: Normalizer,
        tasks: list[str],
        obs_dim: int,
        action_dim: int,
        demo_seeds: dict[str, list[int]] | None = None,
        info: dict | None = None,
    ) -> None:
        self.config, self.flow = config, flow
        self.obs_norm, self.action_norm = obs_norm, action_norm
        self.tasks, self.obs_dim, self.action_dim = list(tasks), int(obs_dim), int(action_dim)
        self.demo_seeds = demo_seeds or {}
        self.info = info or {}

    @property
    def multitask(self) -> bool:
        return len(self.tasks) > 1

    @property
    def context_dim(self) -> int:
        return self.config.obs_horizon * self.obs_dim + (len(self.tasks) if self.multitask else 0)

    @property
    def distilled(self) -> bool:
        return not isinstance(self.flow, LocalFlow)

    def context(self, obs_hist, tasks: list[str] | str | None = None) -> Tensor:
        """The flow's context (B, c) for observation histories (B, T_o, obs_dim) and their tasks."""
        obs = torch.as_tensor(np.asarray(obs_hist), dtype=torch.float64)
        T_o = self.config.obs_horizon
        if obs.dim() != 3 or obs.shape[1:] != (T_o, self.obs_dim):
            raise ValueError(f"obs_hist must have shape (B, {T_o}, {self.obs_dim}), got {tuple(obs.shape)}")
        c = self.obs_norm(obs).flatten(1)
        if not self.multitask:
            if tasks is not None and set([tasks] if isinstance(tasks, str) else tasks) - set(self.tasks):
                raise ValueError(f"this policy was trained on {self.tasks} only, got task(s) {tasks!r}")
            return c
        if tasks is None:
            raise ValueError(f"this multi-task policy needs tasks= (one of {self.tasks}) for every observation")
        tasks = [tasks] * obs.shape[0] if isinstance(tasks, str) else list(tasks)
        if len(tasks) != obs.shape[0]:
            raise ValueError(f"tasks has {len(tasks)} entries for {obs.shape[0]} observation histories")
        unknown = sorted(set(tasks) - set(self.tasks))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; this policy knows {self.tasks}")
        onehot = torch.zeros(obs.shape[0], len(self.tasks), dtype=c.dtype)
        onehot[torch.arange(obs.shape[0]), torch.tensor([self.tasks.index(t) for t in tasks])] = 1.0
        return torch.cat([c, onehot], dim=1)

    @torch.no_grad()
    def act(self, obs_hist, tasks=None, *, generator: torch.Generator | None = None) -> np.ndarray:
        """Action chunks (B, T_p, action_dim) for observation histories (B, T_o, obs_dim)."""
        c = self.context(obs_hist, tasks)
        n = c.shape[0]
        if self.distilled:
            x = self.flow.sample(n, generator=generator, context=c)
        else:
            x = self.flow.sample(n, generator=generator, context=c, guidance=self.config.guidance)
        chunk = self.action_norm.inverse(x.double().reshape(n, self.config.pred_horizon, self.action_dim))
        return chunk.numpy()

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.flow.parameters())

    def save(self, path: str | Path) -> Path:
        """Write the policy folder (assembled under a temporary name and swapped in)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            tensors = {
                "obs_mean": self.obs_norm.mean,
                "obs_scale": self.obs_norm.scale,
                "action_mean": self.action_norm.mean,
                "action_scale": self.action_norm.scale,
            }
            meta = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "localfm_version": __version__,
                "config": to_dict(self.config),
                "tasks": self.tasks,
                "obs_dim": self.obs_dim,
                "action_dim": self.action_dim,
                "demo_seeds": self.demo_seeds,
                "generator": "distilled" if self.distilled else "flow",
                "info": self.info,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            meta["tensors_sha256"] = write_tensors(tmp / "normalizer.safetensors", tensors)
            self.flow.save(tmp / ("distilled" if self.distilled else "flow"))
            write_json(tmp / "policy.json", meta)
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return path


def is_policy(path: str | Path) -> bool:
    return (Path(path) / "policy.json").is_file()


def load_policy(path: str | Path, *, map_location: str | torch.device = "cpu") -> Policy:
    """Rebuild a :class:`Policy` saved by :meth:`Policy.save` (safetensors and JSON only)."""
    from ..checkpoint import load
    from ..distill import load_distilled

    path = Path(path)
    if not (path / "policy.json").is_file():
        raise CheckpointError(f"no localfm policy at {path}: expected a folder with policy.json")
    meta = read_json(path / "policy.json", require_checksum=True)
    sha = check_header(meta, path / "policy.json", FORMAT, FORMAT_VERSION)
    t = read_tensors(path / "normalizer.safetensors", sha)
    try:
        config = from_dict(PolicyConfig, meta["config"], "policy")
        obs_norm = Normalizer(t["obs_mean"], t["obs_scale"])
        action_norm = Normalizer(t["action_mean"], t["action_scale"])
        tasks = [str(x) for x in meta["tasks"]]
        obs_dim, action_dim = int(meta["obs_dim"]), int(meta["action_dim"])
        seeds = {str(k): [int(s) for s in v] for k, v in meta.get("demo_seeds", {}).items()}
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid policy metadata: {err}") from None
    if meta.get("generator") == "distilled":
        flow = load_distilled(path / "distilled", map_location=map_location)
    else:
        flow = load(path / "flow", map_location=map_location)
    if obs_norm.mean.numel() != obs_dim or action_norm.mean.numel() != action_dim:
        raise CheckpointError(f"{path}: the normalizer does not fit obs_dim {obs_dim} / action_dim {action_dim}")
    return Policy(config, flow, obs_norm, action_norm, tasks, obs_dim, action_dim, seeds, meta.get("info") or {})
