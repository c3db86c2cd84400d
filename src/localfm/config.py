"""Run configuration: frozen dataclasses, loaded from YAML or dicts, unknown keys rejected.

The resolved config is written into every run folder and every checkpoint, so a checkpoint
rebuilds its own model with nothing else.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .interpolants import TimeSampler, get_interpolant
from .nets import NetConfig
from .ode import SolverConfig
from .schedules import block_steps, geometric_steps

__all__ = ["BlocksConfig", "TrainConfig", "FlowConfig", "load_config", "from_dict", "to_dict"]


@dataclass(frozen=True)
class BlocksConfig:
    """The OU step sizes ``h_1..h_L`` and whether a final free block carries ``p_L`` to N(0, I).

    ``schedule``: ``"geometric"`` (``h_n = c rho^(n-1)``, n = 1..L), ``"constant"`` (``h_n = c``)
    or ``"list"`` (the explicit ``h``). ``L = 0`` with the free block is global flow matching.
    ``free_block: false`` is the theory's OU-only chain.
    """

    schedule: str = "geometric"
    c: float = 0.025
    rho: float = 1.25
    L: int = 8
    h: tuple[float, ...] = ()
    free_block: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in ("geometric", "constant", "list"):
            raise ValueError(f"blocks.schedule must be 'geometric', 'constant' or 'list', got {self.schedule!r}")
        if self.schedule == "list" and not self.h and not self.free_block:
            raise ValueError("blocks.schedule is 'list' with an empty blocks.h and no free block: no blocks")
        if self.schedule != "list" and self.h:
            raise ValueError(f"blocks.h is given but blocks.schedule is {self.schedule!r}: set schedule: list")
        if self.L > 10_000:
            raise ValueError(f"blocks.L must be at most 10000, got {self.L}")
        self.steps()  # validates every h_n

    def steps(self) -> list[float | None]:
        """Step size of every block in training order; ``None`` is the free block."""
        if self.schedule == "list":
            h = list(self.h)
        elif self.schedule == "constant":
            h = geometric_steps(self.c, 1.0, self.L)
        else:
            h = geometric_steps(self.c, self.rho, self.L)
        return block_steps(h, self.free_block)


@dataclass(frozen=True)
class TrainConfig:
    """How each block is trained.

    ``steps`` is the number of optimiser steps per block (one int, or one per block).
    ``lr_schedule``: ``constant``, ``step`` (times ``gamma`` every ``step_size`` steps) or
    ``cosine`` (to ``lr * min_lr_ratio``), each after ``warmup`` linear warm-up steps.
    ``pairing``: ``dependent`` (x_r made from x_l, the paper), ``shuffled`` (x_r made from a
    permuted batch) or ``independent`` (from a second draw of the pool). ``draws_per_pair`` is the
    number of independent times per pair. ``ema`` is the decay of the weight average used after
    training (``None`` for none). ``amp``: bfloat16 autocast of the network's forward pass in
    training, on CUDA only (ignored, with a logged note, on the CPU).

    ``interpolant``: ``linear`` (default) or ``trig`` (the authors' tabular and 2-D setting). An OU
    block's two ends are close, and the trig path between close points swings out and back, so
    the network learns a large field for a near-identity map; at equal time linear was 0.1 nats
    better on POWER and closed most of LFM's deficit to global FM on the 2-D densities.

    ``parallel_blocks``: train the OU blocks independently against the exact OU marginals of the
    data (side by side on different ranks under torchrun; see :mod:`localfm.parallel`), then push
    the data through them and train the free block as usual; ``finetune_steps`` then trains each OU
    block that many more steps on the pushed pool, in order, before the push through it.

    ``context_dropout``: for conditional flows, the probability that a pair's context is replaced
    by the network's learned null context (classifier-free guidance; ``guidance=`` at sampling).

    ``push_points``: push only this many training points (a fixed random subset, the same on every
    rank and on resume) through the blocks; blocks after the first train on that pushed subset.
    ``None`` pushes them all. The pushforward is LFM's overhead over global flow matching; a pool of
    a few tens of thousands of points is plenty for the smoother distributions of later blocks.

    ``pool_storage``: where the pools live. ``device`` keeps them on the training device; ``disk``
    writes each one, batch by batch, to a memory-mapped ``.npy`` file (in the run's checkpoint
    folder, referred to by the checkpoints; in a temporary folder without ``run_dir``) and draws
    minibatches from it; ``auto`` chooses disk when a pool would take more than half of the
    device's free memory. Results are the same either way (see :mod:`localfm.pools`).
    """

    steps: int | tuple[int, ...] = 2000
    batch_size: int = 1024
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    warmup: int = 0
    step_size: int = 1000
    gamma: float = 0.99
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float | None = None
    ema: float | None = None
    interpolant: str = "linear"
    time_dist: str = "uniform"
    time_a: float = 1.0
    time_b: float = 1.0
    draws_per_pair: int = 1
    pairing: str = "dependent"
    warm_start: bool = True
    push_batch_size: int = 16384
    push_points: int | None = None
    pool_storage: str = "auto"
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    log_every: int = 50
    amp: bool = False
    parallel_blocks: bool = False
    finetune_steps: int = 0
    context_dropout: float = 0.0

    def __post_init__(self) -> None:
        steps = self.steps if isinstance(self.steps, tuple) else (self.steps,)
        if not steps or any(not isinstance(s, int) or s < 1 for s in steps):
            raise ValueError(f"train.steps must be an integer >= 1 or a list of them, got {self.steps!r}")
        for name in ("batch_size", "draws_per_pair", "push_batch_size", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "checkpoint_every", "step_size", "finetune_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"train.lr must be > 0 and finite, got {self.lr}")
        if self.lr_schedule not in ("constant", "step", "cosine"):
            raise ValueError(f"train.lr_schedule must be constant, step or cosine, got {self.lr_schedule!r}")
        if self.lr_schedule == "step" and self.step_size < 1:
            raise ValueError("train.step_size must be >= 1 with lr_schedule: step")
        if not 0 < self.gamma <= 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("train.gamma must be in (0, 1] and train.min_lr_ratio in [0, 1]")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ValueError(f"train.ema must be a decay in (0, 1) or null, got {self.ema}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"train.grad_clip must be > 0 or null, got {self.grad_clip}")
        if not (0 <= self.weight_decay < math.inf):
            raise ValueError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if self.pairing not in ("dependent", "shuffled", "independent"):
            raise ValueError(f"train.pairing must be dependent, shuffled or independent, got {self.pairing!r}")
        if self.finetune_steps and not self.parallel_blocks:
            raise ValueError(
                f"train.finetune_steps ({self.finetune_steps}) fine-tunes blocks trained with "
                "train.parallel_blocks: true; set that too, or drop train.finetune_steps"
            )
        if self.push_points is not None and not (isinstance(self.push_points, int) and self.push_points >= 2):
            raise ValueError(f"train.push_points must be an integer >= 2 or null (push all), got {self.push_points!r}")
        if self.pool_storage not in ("auto", "device", "disk"):
            raise ValueError(f"train.pool_storage must be auto, device or disk, got {self.pool_storage!r}")
        if not 0 <= self.context_dropout < 1:
            raise ValueError(f"train.context_dropout must be a probability in [0, 1), got {self.context_dropout}")
        get_interpolant(self.interpolant)
        self.time_sampler()

    def time_sampler(self) -> TimeSampler:
        return TimeSampler(self.time_dist, self.time_a, self.time_b)

    def steps_for(self, n_blocks: int) -> list[int]:
        """Optimiser steps of each of ``n_blocks`` blocks."""
        if isinstance(self.steps, int):
            return [self.steps] * n_blocks
        if len(self.steps) != n_blocks:
            raise ValueError(f"train.steps lists {len(self.steps)} values but the flow has {n_blocks} blocks")
        return list(self.steps)

    def sequential_steps(self, hs: list[float | None]) -> list[int]:
        """Steps of each block (step sizes ``hs``, ``None`` = free) in the block-by-block pass.

        ``steps_for`` except with ``parallel_blocks``, where the OU blocks were trained beforehand
        and take ``finetune_steps`` here.
        """
        steps = self.steps_for(len(hs))
        if not self.parallel_blocks:
            return steps
        return [s if h is None else self.finetune_steps for s, h in zip(steps, hs, strict=True)]


@dataclass(frozen=True)
class FlowConfig:
    """Everything that defines an LFM run.

    ``data`` names a dataset (``localfm datasets`` lists them) or a data file; ``data_root`` is the
    folder for datasets that come from the user (GAS, HEPMASS, MINIBOONE, BSDS300, CIFAR-10).
    ``data_limit``: train on the first ``data_limit`` training points only (all when null), e.g. to
    keep the pushforward of a large image set short on a CPU; evaluation still uses the whole split.
    """

    data: str | None = None
    data_root: str | None = None
    data_limit: int | None = None
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    net: NetConfig = field(default_factory=NetConfig)
    blocks: BlocksConfig = field(default_factory=BlocksConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if not (self.device in ("cpu", "cuda", "auto") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        if self.data_limit is not None and self.data_limit < 2:
            raise ValueError(f"data_limit must be >= 2 training points or null, got {self.data_limit}")
        self.train.steps_for(len(self.blocks.steps()))

    def replace(self, **changes: Any) -> FlowConfig:
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass, with the checks a YAML file needs


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise TypeError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is tuple:
        (item,) = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a mapping of settings, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported setting type {tp}")


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build the dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise TypeError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            raise ValueError(f"{where}: unknown key {key!r}{hint}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain-data view of a config dataclass (tuples become lists), for YAML and JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(obj)


def set_option(data: dict[str, Any], assignment: str) -> None:
    """Apply ``"train.lr=3e-4"`` (value parsed as YAML) to a nested settings dict in place."""
    if "=" not in assignment:
        raise ValueError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {key}: {p!r} is not a group of settings")
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(source: str | Path | dict[str, Any] | FlowConfig | None = None, overrides=()) -> FlowConfig:
    """Resolve a config from a YAML path, a dict, a :class:`FlowConfig` or ``None`` (defaults)."""
    if isinstance(source, FlowConfig) and not overrides:
        return source
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, FlowConfig):
        data = to_dict(source)
    elif isinstance(source, dict):
        data = copy.deepcopy(source)  # --set overrides write into nested groups: never the caller's
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping of settings at the top level")
    for assignment in overrides:
        set_option(data, assignment)
    return from_dict(FlowConfig, data)
