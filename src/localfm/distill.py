"""Distillation: a few-step student map for each block (or group of blocks) of a trained flow.

The paper distils each sub-flow separately but publishes no recipe; this is ours. A student for
the blocks ``a..b`` (``a`` nearest the data, 1-based as in the paper) maps the noise side of block
``b``, ``x_b``, to the data side of block ``a``, ``x_{a-1}``, in ``k`` steps of a learned Euler
scheme that runs, like the teacher's inverse, from ``t = 1`` to ``t = 0``::

    x^(0) = x_b,    x^(j+1) = x^(j) - (1/k) G(x^(j), t_j),    t_j = 1 - j/k,    x_{a-1} ~ x^(k)

``G`` has the block network's architecture. Initialised from the teacher's weights as they are
(``init="teacher"``) the student starts as the teacher's own k-step Euler solve; but with the trig
interpolant (the authors') a block's paths between two nearby points bulge out and come back, so
one Euler step of a block is far off (benchmarks/results/distill_tree_ablation.md) while the block's
map is close to the identity. The default ``init="identity"`` therefore keeps the teacher's
weights but zeroes the output layer: the student starts as the identity map, with the teacher's
features.

Students are trained one after another by regression, ``min E || G_k(x_in) - x_{a-1} ||^2``,
noise side first, on teacher trajectories from two sources:

* **data side**: the pushforward pools of training, ``pool_n = T_n(pool_{n-1})`` with
  ``pool_0`` the standardised training data. ``fit`` does not keep them, so they are recomputed
  here with the same pushforward training used (:func:`localfm.training.push`, the flow's solver
  and ``train.push_batch_size``), on at most ``data_pairs`` training points;
* **generation side**: fresh noise ``z`` decoded by the teacher through blocks ``N..1``, so the
  students also see the points they will meet when sampling. ``generation_fraction`` of every
  minibatch comes from here.

With ``chained=True`` (default) the input ``x_in`` is not the teacher's ``x_b`` but what the
students already trained make of the trajectory's code: each student learns to correct the errors
of those before it instead of adding its own to them. With ``chained=False``, ``x_in = x_b``.

Sampling then costs ``sum_i k_i`` network evaluations instead of one adaptive solve per block.
Distilled maps are not invertible by construction and have no exact likelihood.

Example::

    flow = localfm.fit(x_train)
    fast = distill(flow, DistillConfig(steps_per_block=1), x_train=x_train)
    x = fast.sample(10_000, generator=torch.Generator().manual_seed(0))   # len(flow) evaluations
    fast.save("runs/mine/distilled-k1"); fast = load_distilled("runs/mine/distilled-k1")
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import __version__
from .checkpoint import CheckpointError, check_header, read_json, read_tensors, write_json, write_tensors
from .config import FlowConfig, from_dict, to_dict
from .flow import FlowOutput, LocalFlow, Standardizer, check_context, check_data
from .nets import build_net
from .ode import SolverConfig
from .training import Progress, push

__all__ = [
    "DistillConfig",
    "Student",
    "DistilledFlow",
    "TeacherPairs",
    "NoLikelihoodError",
    "distill",
    "teacher_pairs",
    "train_student",
    "load_distilled",
    "is_distilled",
    "distill_run",
]

FORMAT = "localfm-distilled"
FORMAT_VERSION = 1
META_FILE = "distilled.json"
INITS = ("identity", "teacher", "fresh")
TENSOR_FILE = "model.safetensors"


class NoLikelihoodError(NotImplementedError):
    """A distilled flow was asked for a density it cannot give."""


@dataclass(frozen=True)
class DistillConfig:
    """How a flow is distilled.

    ``steps_per_block``: Euler steps ``k`` of each student. ``group_size``: consecutive blocks
    ``m`` merged into one student, grouped from the data side (the last group may be shorter);
    ``m = 1`` is one student per block, ``m = len(flow)`` one student for the whole chain.
    ``train_steps``, ``batch_size``, ``lr`` (cosine-decayed to 0 after ``warmup`` steps),
    ``grad_clip``: the regression of each student. ``generation_fraction``: share of each minibatch
    drawn from teacher decodes of fresh noise (``generation_pairs`` of them are made), the rest
    from the data-side pools (on at most ``data_pairs`` training points, ``None`` for all).
    ``init``: ``"identity"`` (the weights of the group's noise-side block with the output layer
    zeroed: the student starts as the identity map with the teacher's features), ``"teacher"``
    (those weights as they are: the student starts as the teacher's own k-step Euler solve) or
    ``"fresh"`` (a new network of the teacher's architecture, output layer zeroed).
    ``width``: the hidden width of fresh MLP students (``None``: the teacher's), e.g. to give a
    student that merges every block as many parameters as a global model's network; needs ``init:
    fresh``, since a student of another width cannot start from the teacher's weights.
    ``chained``: train the students noise side first, each on the outputs of the students before it
    (run on the teacher's trajectories), so that it corrects their errors instead of inheriting them;
    ``False`` trains each on the teacher's own points.
    ``solver``: the teacher's solver for the generation-side pairs (``None``: the flow's own).
    ``val_pairs``: held-out generation-side pairs on which each student's error is measured.
    """

    steps_per_block: int = 1
    group_size: int = 1
    train_steps: int = 2000
    batch_size: int = 1024
    lr: float = 1e-3
    warmup: int = 0
    grad_clip: float | None = 1.0
    generation_fraction: float = 0.5
    generation_pairs: int = 50_000
    data_pairs: int | None = 100_000
    init: str = "identity"
    width: int | None = None
    chained: bool = True
    solver: SolverConfig | None = None
    val_pairs: int = 2048
    seed: int = 0
    log_every: int = 100

    def __post_init__(self) -> None:
        for name in ("steps_per_block", "group_size", "train_steps", "batch_size", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"distill.{name} must be an integer >= 1, got {value!r}")
        for name in ("generation_pairs", "val_pairs", "warmup"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"distill.{name} must be an integer >= 0, got {value!r}")
        if self.data_pairs is not None and (not isinstance(self.data_pairs, int) or self.data_pairs < 1):
            raise ValueError(f"distill.data_pairs must be an integer >= 1 or null (all), got {self.data_pairs!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"distill.lr must be a number > 0, got {self.lr!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"distill.grad_clip must be > 0 or null, got {self.grad_clip!r}")
        if not (isinstance(self.generation_fraction, (int, float)) and 0 <= self.generation_fraction <= 1):
            raise ValueError(f"distill.generation_fraction must be in [0, 1], got {self.generation_fraction!r}")
        if self.generation_fraction > 0 and self.generation_pairs < 1:
            raise ValueError(
                f"distill.generation_pairs must be >= 1 when distill.generation_fraction > 0 "
                f"(is {self.generation_fraction}), got {self.generation_pairs}"
            )
        if self.init not in INITS:
            raise ValueError(f"distill.init must be one of {INITS}, got {self.init!r}")
        if self.width is not None:
            if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
                raise ValueError(f"distill.width must be an integer >= 1 or null (the teacher's), got {self.width!r}")
            if self.init != "fresh":
                raise ValueError(
                    f"distill.width needs distill.init: fresh (a student of another width cannot start from the "
                    f"teacher's weights), got init {self.init!r}"
                )
        if not isinstance(self.chained, bool):
            raise ValueError(f"distill.chained must be true or false, got {self.chained!r}")
        if self.solver is not None and not isinstance(self.solver, SolverConfig):
            raise TypeError(f"distill.solver must be a SolverConfig or None, got {type(self.solver).__name__}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillConfig:
        """Build from plain data (YAML/JSON), rejecting unknown keys with a suggestion."""
        return from_dict(cls, data, "distill")

    def replace(self, **changes: Any) -> DistillConfig:
        return dataclasses.replace(self, **changes)


def _time(t: float, like: Tensor) -> Tensor:
    return torch.tensor(t, dtype=like.dtype, device=like.device)


class Student(nn.Module):
    """``k`` learned Euler steps from ``t = 1`` to ``t = 0``: the map of blocks ``first..last``.

    ``first`` and ``last`` are 0-based block indices (``first`` nearest the data); the student maps
    the noise side of block ``last`` to the data side of block ``first``.
    """

    def __init__(self, net: nn.Module, steps: int, first: int, last: int) -> None:
        super().__init__()
        self.net, self.steps, self.first, self.last = net, int(steps), int(first), int(last)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``context`` (B, c) conditions a student of a conditional flow, as it did the teacher."""
        k = self.steps
        for j in range(k):
            t = _time(1 - j / k, x)
            x = x - (self.net(x, t) if context is None else self.net(x, t, context)) / k
        return x

    def extra_repr(self) -> str:
        return f"blocks {self.first}..{self.last}, steps={self.steps}"


class DistilledFlow(nn.Module):
    """Noise to data through a chain of few-step students: ``sum_i k_i`` network evaluations.

    Students are held nearest the data first (like ``LocalFlow.blocks``) and run last to first.
    ``teacher_config`` is the teacher's :class:`FlowConfig` (it rebuilds the networks on load);
    ``log`` records, per student, its blocks, losses, seconds and held-out error.
    """

    def __init__(
        self,
        event_shape,
        students,
        standardizer: Standardizer,
        config: DistillConfig,
        teacher_config: FlowConfig | None = None,
        teacher_blocks: int | None = None,
    ) -> None:
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)
        self.students = nn.ModuleList(students)
        self.standardizer = standardizer
        self.config = config
        self.teacher_config = teacher_config
        self.teacher_blocks = teacher_blocks if teacher_blocks is not None else (self.students[-1].last + 1)
        self.log: list[dict] = []

    def __len__(self) -> int:
        return len(self.students)

    @property
    def nfe(self) -> int:
        """Network evaluations per sample."""
        return sum(s.steps for s in self.students)

    @property
    def device(self) -> torch.device:
        return self.standardizer.mean.device

    @property
    def context_dim(self) -> int:
        """Size c of the context the students take (0: unconditional), as the teacher's."""
        return int(getattr(self.students[0].net, "context_dim", 0)) if len(self.students) else 0

    def _dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.get_default_dtype()

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}, students={len(self)}, nfe={self.nfe}"

    @torch.no_grad()
    def decode(self, z: Tensor, *, return_path: bool = False, context: Tensor | None = None) -> FlowOutput:
        """Codes ``z`` (B, ...) to data units; ``nfe`` lists each student's evaluations, data side first.

        A distilled conditional flow takes ``context`` (B, c) like its teacher.
        """
        z = check_data(z, "z", self.event_shape).to(self.device, self._dtype())
        context = check_context(context, z.shape[0], self.context_dim)
        context = context.to(z) if context is not None else None
        x, path = z, [z] if return_path else None
        for student in reversed(self.students):
            x = student(x, context)
            if return_path:
                path.append(x)
        out_path = [self.standardizer.inverse(p) for p in path] if return_path else None
        return FlowOutput(self.standardizer.inverse(x), None, [s.steps for s in self.students], out_path)

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        batch_size: int = 65536,
        context: Tensor | None = None,
    ) -> Tensor:
        """``n`` samples in data units; draws ``z`` exactly as ``LocalFlow.sample`` does, so the
        same generator state gives the teacher's and the student's images of the same noise."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"n must be a positive integer, got {type(n).__name__} {n!r}")
        if n < 1:
            raise ValueError(f"n must be a positive integer, got {n}")
        n = int(n)
        device = generator.device if generator is not None else self.device
        z = torch.randn((n, *self.event_shape), generator=generator, dtype=self._dtype(), device=device)
        context = check_context(context, n, self.context_dim)
        return torch.cat(
            [
                self.decode(z[i : i + batch_size], context=None if context is None else context[i : i + batch_size]).x
                for i in range(0, n, batch_size)
            ]
        )

    def log_prob(self, *args, **kwargs) -> Tensor:
        raise NoLikelihoodError(
            "distilled maps have no exact likelihood (the students are not invertible and carry no "
            "log-determinant); use the teacher flow's log_prob, or sample metrics such as "
            "localfm.metrics.energy_distance on DistilledFlow.sample"
        )

    def save(self, path: str | Path) -> Path:
        return save_distilled(self, path)


# ---------------------------------------------------------------------------------------------
# teacher pairs


@dataclass
class TeacherPairs:
    """Points on both sides of every block, in standardised units.

    ``data[n]`` (n = 0..N): the training data pushed through blocks ``1..n`` (``data[0]`` the
    standardised data), or ``None``. ``generation[n]``: fresh noise ``generation[N]`` decoded by
    the teacher down to block ``n + 1``, or ``None``. ``val`` is held-out generation-side points.
    For a conditional teacher, ``contexts[k]`` (k in ``data``, ``generation``, ``val``) holds the
    context of each trajectory of ``k`` (the generation side draws them from the training contexts).
    """

    data: list[Tensor] | None
    generation: list[Tensor] | None
    val: list[Tensor] | None
    contexts: dict[str, Tensor] | None = None


@torch.no_grad()
def _decode_path(
    flow: LocalFlow, z: Tensor, solver: SolverConfig, batch_size: int, context: Tensor | None = None
) -> list[Tensor]:
    """``[x_0, .., x_N]`` for codes ``x_N = z``: each block's inverse applied in turn, in batches."""
    path = [z]

    def ctx(i: int) -> Tensor | None:
        return None if context is None else context[i : i + batch_size]

    for index in reversed(range(len(flow))):
        x, block, block_solver = path[-1], flow.blocks[index], solver.for_block(index)
        path.append(
            torch.cat(
                [
                    block.inverse(x[i : i + batch_size], solver=block_solver, context=ctx(i)).x
                    for i in range(0, len(x), batch_size)
                ]
            )
        )
    return path[::-1]


def teacher_pairs(
    flow: LocalFlow,
    config: DistillConfig,
    *,
    x_train: Tensor | None = None,
    pools: list[Tensor] | None = None,
    generator: torch.Generator,
    callback: Callable[[Progress], None] | None = None,
    context: Tensor | None = None,
) -> TeacherPairs:
    """Build the regression pairs of :func:`distill` (see the module docstring).

    ``context`` (N, c), row-aligned with ``x_train`` (or ``pools``), is needed for a conditional
    teacher: the data side keeps each point's context, the generation side draws contexts from it.
    """
    N, dtype, device = len(flow), flow._dtype(), flow.device
    # The data side's points, or (generation side only) any number of contexts to draw from.
    rows = len(x_train) if x_train is not None else (len(pools[0]) if pools is not None else None)
    rows = rows if rows is not None else (len(context) if context is not None else 0)
    if flow.context_dim and context is None:
        raise ValueError(
            f"the teacher is conditional (net.context_dim = {flow.context_dim}): pass context= (N, c), "
            "one row per training point"
        )
    context = check_context(context, rows, flow.context_dim) if context is not None else None
    context = context.to(device, dtype) if context is not None else None
    contexts: dict[str, Tensor] = {}
    batch = flow.config.train.push_batch_size if flow.config is not None else 16384
    solver = config.solver or flow.solver
    data = None
    if config.generation_fraction < 1:
        if pools is not None:
            if len(pools) != N + 1:
                raise ValueError(
                    f"pools must hold N + 1 = {N + 1} tensors (data side of block 1 to codes), got {len(pools)}"
                )
            data = [check_data(p, f"pools[{i}]", flow.event_shape).to(device, dtype) for i, p in enumerate(pools)]
            if context is not None:
                contexts["data"] = context
        elif x_train is not None:
            x = check_data(x_train, "x_train", flow.event_shape).to(device, dtype)
            c = context
            if config.data_pairs is not None and x.shape[0] > config.data_pairs:
                keep = torch.randperm(x.shape[0], generator=generator, device=generator.device)[: config.data_pairs]
                x, c = x[keep], (c[keep] if c is not None else None)
            if c is not None:
                contexts["data"] = c
            data = [flow.standardizer(x)]
            # The same pushforward as training: the flow's solver, training's push batch size.
            for n, block in enumerate(flow.blocks):
                report = None
                if callback is not None:

                    def report(done: int, total: int, n: int = n) -> None:
                        callback(Progress("push", n, N, done, total))

                data.append(push(block, data[-1], flow.solver.for_block(n), batch, report, contexts.get("data")))
        else:
            raise ValueError(
                f"distill needs x_train= or pools= for the data-side pairs (distill.generation_fraction is "
                f"{config.generation_fraction}); pass one, or set generation_fraction: 1.0"
            )
    generation = val = None
    n_gen = config.generation_pairs if config.generation_fraction > 0 else 0
    if n_gen + config.val_pairs > 0:
        z = torch.randn(
            (n_gen + config.val_pairs, *flow.event_shape), generator=generator, device=generator.device, dtype=dtype
        )
        c = None
        if context is not None:
            c = context[torch.randint(context.shape[0], (z.shape[0],), generator=generator, device=generator.device)]
            if n_gen:
                contexts["generation"] = c[:n_gen]
            if config.val_pairs:
                contexts["val"] = c[n_gen:]
        if callback is not None:
            callback(Progress("decode", N - 1, N, 0, z.shape[0]))
        path = _decode_path(flow, z.to(device), solver, batch, c)
        generation = [p[:n_gen] for p in path] if n_gen else None
        val = [p[n_gen:] for p in path] if config.val_pairs else None
    return TeacherPairs(data, generation, val, contexts or None)


# ---------------------------------------------------------------------------------------------
# training


def _groups(n_blocks: int, size: int) -> list[tuple[int, int]]:
    """0-based ``(first, last)`` block spans of size ``size`` from the data side."""
    return [(a, min(a + size, n_blocks) - 1) for a in range(0, n_blocks, size)]


@torch.no_grad()
def _apply(student: Student, x: Tensor, context: Tensor | None = None, batch: int = 16384) -> Tensor:
    def ctx(i: int) -> Tensor | None:
        return None if context is None else context[i : i + batch]

    return torch.cat([student(x[i : i + batch], ctx(i)) for i in range(0, x.shape[0], batch)])


def _rms(x: Tensor) -> float:
    return float(x.pow(2).mean().sqrt())


def _zero_output_layer(net: nn.Module) -> nn.Module:
    """Zero the weights and bias of the last linear or convolution layer (the student starts at the identity)."""
    last = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if not last:
        raise ValueError(
            "distill.init 'identity' and 'fresh' zero the network's output layer, but this network has no "
            "nn.Linear or nn.Conv layer; use init: teacher"
        )
    with torch.no_grad():
        last[-1].weight.zero_()
        if last[-1].bias is not None:
            last[-1].bias.zero_()
    return net


def _student_config(teacher: FlowConfig | None, cfg: DistillConfig) -> FlowConfig | None:
    """The config the students' networks are built from: the teacher's, with ``cfg.width`` if set."""
    if cfg.width is None:
        return teacher
    if teacher is None:
        raise ValueError("distill.width changes the teacher's net config and this flow has none: use net_factory=")
    if teacher.net.kind != "mlp":
        raise ValueError(f"distill.width applies to MLP students; the teacher's net.kind is {teacher.net.kind!r}")
    return dataclasses.replace(teacher, net=dataclasses.replace(teacher.net, width=cfg.width))


def _student_net(
    flow: LocalFlow, last_block: int, cfg: DistillConfig, index: int, net_factory, config: FlowConfig | None
) -> nn.Module:
    """Student ``index``'s network: fresh from ``config`` (see :func:`_student_config`) or a copy of a block's."""
    if cfg.init == "fresh":
        dim = flow.event_shape[0] if len(flow.event_shape) == 1 else flow.event_shape
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + index)
            net = (net_factory or (lambda d, c: build_net(d, c.net)))(dim, config)
    else:
        net = copy.deepcopy(flow.blocks[last_block].net)
    net = net.to(flow.device, flow._dtype())
    return net if cfg.init == "teacher" else _zero_output_layer(net)


def train_student(
    student: Student,
    sources: list[tuple[Tensor, Tensor, float]],
    config: DistillConfig,
    *,
    generator: torch.Generator,
    report: Callable[[int, float, float], None] | None = None,
) -> list[tuple[int, float]]:
    """Regress ``student(x)`` onto ``y`` over minibatches mixed from ``sources``.

    Each source is ``(x, y, share)`` with ``x``, ``y`` of shape (P, ...); ``share`` of every
    minibatch comes from it; a fourth entry, a context (P, c), conditions the student.
    ``report(step, mean_loss, lr)`` is called every ``log_every`` steps.
    Returns the logged ``(step, mean_loss)``.
    """
    sources = [(*src, None) if len(src) == 3 else tuple(src) for src in sources]
    sizes = [round(share * config.batch_size) for _, _, share, _ in sources]
    sizes[-1] = config.batch_size - sum(sizes[:-1])
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.lr)
    losses, loss_sum, since = [], 0.0, 0
    student.train()
    for step in range(config.train_steps):
        if step < config.warmup:
            lr = config.lr * (step + 1) / config.warmup
        else:
            lr = (
                config.lr
                * 0.5
                * (1 + math.cos(math.pi * (step - config.warmup) / max(1, config.train_steps - config.warmup)))
            )
        for group in opt.param_groups:
            group["lr"] = lr
        xs, ys, cs = [], [], []
        for (x, y, _, c), size in zip(sources, sizes, strict=True):
            if size > 0:
                idx = torch.randint(x.shape[0], (size,), generator=generator, device=generator.device).to(x.device)
                xs.append(x[idx])
                ys.append(y[idx])
                cs.append(c[idx] if c is not None else None)
        x, y = torch.cat(xs), torch.cat(ys)
        c = None if any(c is None for c in cs) else torch.cat(cs)
        loss = (student(x, c) - y).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        loss_sum += float(loss.detach())
        since += 1
        if (step + 1) % config.log_every == 0 or step + 1 == config.train_steps:
            mean = loss_sum / since
            if not math.isfinite(mean):
                raise FloatingPointError(
                    f"distillation diverged at step {step + 1} (loss {mean}); lower distill.lr or set distill.grad_clip"
                )
            losses.append((step + 1, mean))
            if report is not None:
                report(step + 1, mean, lr)
            loss_sum, since = 0.0, 0
    student.eval()
    return losses


def distill(
    flow: LocalFlow,
    config: DistillConfig | dict | None = None,
    *,
    x_train=None,
    pools: list[Tensor] | None = None,
    pairs: TeacherPairs | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[Progress], None] | None = None,
    net_factory: Callable | None = None,
    context: Tensor | None = None,
) -> DistilledFlow:
    """Distil ``flow`` into few-step students (see the module docstring for the method).

    Args:
        flow: the trained teacher :class:`LocalFlow` (left unchanged).
        config: :class:`DistillConfig`, a dict of its fields, or ``None`` for defaults.
        x_train: the training data (N, ...) in data units, for the data-side pairs.
        pools: instead of ``x_train``, the pushforward pools in standardised units
            (``N + 1`` tensors: data side of block 1, ..., codes).
        pairs: ready-made :func:`teacher_pairs` (made with the same sources), e.g. to distil one
            teacher with several settings; replaces ``x_train`` and ``pools``.
        generator: every random draw (default: seeded with ``config.seed``).
        callback: called with :class:`~localfm.training.Progress` (phases ``push``, ``decode``,
            ``train``, ``done``; ``block`` is the student index).
        net_factory: ``(dim, flow_config) -> nn.Module`` for students not initialised from the teacher.
        context: for a conditional teacher, the contexts (N, c) of ``x_train`` (or of the pools'
            points); teacher and students take the same context, the generation-side pairs draw
            theirs from these rows.

    Returns:
        A :class:`DistilledFlow` with ``len(flow) / group_size`` students (rounded up).
    """
    if not isinstance(flow, LocalFlow):
        raise TypeError(f"flow must be a LocalFlow, got {type(flow).__name__}")
    if len(flow) == 0:
        raise ValueError("flow has no blocks: train it first")
    cfg = config if isinstance(config, DistillConfig) else DistillConfig.from_dict(dict(config or {}))
    net_cfg = getattr(flow.config, "net", None)
    if cfg.init == "fresh" and net_cfg is None and net_factory is None:
        raise ValueError("distill.init is 'fresh' and the flow has no config to build networks from: pass net_factory=")
    student_config = _student_config(flow.config, cfg)  # refuses a width it cannot apply before any solve
    generator = generator or torch.Generator(flow.device).manual_seed(cfg.seed)
    t_start = time.perf_counter()
    if pairs is None:
        pairs = teacher_pairs(
            flow, cfg, x_train=x_train, pools=pools, generator=generator, callback=callback, context=context
        )
    elif (cfg.generation_fraction < 1 and pairs.data is None) or (
        cfg.generation_fraction > 0 and pairs.generation is None
    ):
        raise ValueError(
            f"pairs lacks the data-side or generation-side points that distill.generation_fraction = "
            f"{cfg.generation_fraction} asks for"
        )
    if flow.context_dim and not pairs.contexts:
        raise ValueError(
            "the teacher is conditional but pairs= carry no contexts: make them with teacher_pairs(context=)"
        )
    spans = _groups(len(flow), cfg.group_size)
    paths = {"data": pairs.data, "generation": pairs.generation, "val": pairs.val}
    ctx = pairs.contexts or {}
    share = {"data": 1 - cfg.generation_fraction, "generation": cfg.generation_fraction}
    # Where the students so far take each trajectory's code: the inputs of the next student.
    current = {k: p[-1] for k, p in paths.items() if p is not None}
    students: list[Student | None] = [None] * len(spans)
    log: list[dict] = [{}] * len(spans)
    for i in reversed(range(len(spans))):  # train block n, hand its outputs on, go on (noise side first)
        a, b = spans[i]
        student = Student(_student_net(flow, b, cfg, i, net_factory, student_config), cfg.steps_per_block, a, b)
        student.requires_grad_(True)
        inputs = {k: (current[k] if cfg.chained else paths[k][b + 1]) for k in current}
        sources = [
            (inputs[k], paths[k][a], share[k], ctx.get(k)) for k in share if paths[k] is not None and share[k] > 0
        ]

        def report(step: int, loss: float, lr: float, i: int = i) -> None:
            if callback is not None:
                callback(Progress("train", i, len(spans), step, cfg.train_steps, loss=loss, lr=lr))

        t0 = time.perf_counter()
        losses = train_student(student, sources, cfg, generator=generator, report=report)
        student.requires_grad_(False)
        entry = {"student": i, "blocks": [a, b], "steps": cfg.steps_per_block, "losses": losses}
        entry["train_seconds"] = time.perf_counter() - t0
        if cfg.chained:
            current = {k: _apply(student, x, ctx.get(k)) for k, x in current.items()}
        if pairs.val is not None:
            # Held-out error, absolute (standardised units) and as a share of the teacher's displacement.
            out_val = current["val"] if cfg.chained else _apply(student, pairs.val[b + 1], ctx.get("val"))
            err = _rms(out_val - pairs.val[a])
            entry["val_rms_error"] = err
            entry["val_relative_error"] = err / max(_rms(pairs.val[b + 1] - pairs.val[a]), 1e-300)
        log[i] = entry
        students[i] = student
    out = DistilledFlow(flow.event_shape, students, copy.deepcopy(flow.standardizer), cfg, flow.config, len(flow))
    out.log = log
    out.log.append({"total_seconds": time.perf_counter() - t_start})
    if callback is not None:
        callback(Progress("done", len(spans) - 1, len(spans), len(spans), len(spans)))
    return out.eval()


# ---------------------------------------------------------------------------------------------
# files


def save_distilled(model: DistilledFlow, path: str | Path) -> Path:
    """Save into the folder ``path`` (``model.safetensors`` + ``distilled.json``), swapped in whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "localfm_version": __version__,
            "event_shape": list(model.event_shape),
            "students": [{"first": s.first, "last": s.last, "steps": s.steps} for s in model.students],
            "teacher_blocks": model.teacher_blocks,
            "nfe": model.nfe,
            "distill_config": to_dict(model.config),
            "teacher_config": to_dict(model.teacher_config) if model.teacher_config is not None else None,
            "log": model.log,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        meta["tensors_sha256"] = write_tensors(tmp / TENSOR_FILE, dict(model.state_dict()))
        write_json(tmp / META_FILE, meta)
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


def is_distilled(path: str | Path) -> bool:
    """Whether ``path`` is a folder saved by :meth:`DistilledFlow.save` (never raises)."""
    try:
        return read_json(Path(path) / META_FILE).get("format") == FORMAT
    except (CheckpointError, OSError):
        return False


def load_distilled(path: str | Path, *, net_factory=None, map_location: str | torch.device = "cpu") -> DistilledFlow:
    """Rebuild a :class:`DistilledFlow` from its folder, without executing anything from it.

    ``net_factory(dim_or_shape, teacher_config) -> nn.Module`` rebuilds custom networks; by
    default the MLP of the saved teacher config is built.
    """
    path = Path(path)
    if path.is_file() and path.name in (META_FILE, TENSOR_FILE):
        path = path.parent
    if not (path / META_FILE).is_file():
        raise CheckpointError(
            f"no distilled localfm model at {path}: expected a folder with {META_FILE} and {TENSOR_FILE}"
        )
    meta = read_json(path / META_FILE, require_checksum=True)
    tensors = read_tensors(path / TENSOR_FILE, check_header(meta, path, FORMAT, FORMAT_VERSION))
    try:
        cfg = from_dict(DistillConfig, meta["distill_config"], "distill")
        teacher = from_dict(FlowConfig, meta["teacher_config"]) if meta.get("teacher_config") is not None else None
        event_shape = tuple(int(s) for s in meta["event_shape"])
        spans = [(int(s["first"]), int(s["last"]), int(s["steps"])) for s in meta["students"]]
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid metadata in {META_FILE}: {err}") from None
    if teacher is None and net_factory is None:
        raise CheckpointError(f"{path}: no teacher config saved; pass net_factory= to rebuild the networks")
    dim = event_shape[0] if len(event_shape) == 1 else event_shape
    factory = net_factory or (lambda d, c: build_net(d, c.net))
    try:
        built = _student_config(teacher, cfg)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    students = [Student(factory(dim, built), k, a, b) for a, b, k in spans]
    model = DistilledFlow(
        event_shape, students, Standardizer.identity(event_shape), cfg, teacher, meta.get("teacher_blocks")
    )
    expected = model.state_dict()
    if set(tensors) != set(expected):
        missing, unexpected = sorted(set(expected) - set(tensors))[:3], sorted(set(tensors) - set(expected))[:3]
        raise CheckpointError(
            f"{path}: tensor names do not match the students the metadata describes "
            f"(missing {missing}, unexpected {unexpected})"
        )
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"{path}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    dtypes = {v.dtype for k, v in tensors.items() if k.startswith("students.")}
    if len(dtypes) == 1:
        model.students.to(next(iter(dtypes)))
    model.load_state_dict(tensors)
    model.log = meta.get("log") or []
    return model.requires_grad_(False).eval().to(map_location)


def distill_run(
    run_dir: str | Path,
    steps: int = 1,
    *,
    load_data: Callable[[FlowConfig], Any],
    config: DistillConfig | dict | None = None,
    group_size: int | None = None,
    callback: Callable[[Progress], None] | None = None,
    net_factory: Callable | None = None,
) -> Path:
    """Distil the model of a training run and save it beside it; returns the folder written.

    Reads ``run_dir/model``, calls ``load_data(flow.config)`` for the training points (data
    units), distils with ``config`` (``steps`` and ``group_size`` override its fields) and writes
    ``run_dir/distilled-k{steps}`` (``-m{group_size}`` appended when blocks are merged).
    """
    from .checkpoint import load

    run_dir = Path(run_dir)
    flow = load(run_dir / "model", net_factory=net_factory)
    cfg = config if isinstance(config, DistillConfig) else DistillConfig.from_dict(dict(config or {}))
    changes: dict[str, Any] = {"steps_per_block": steps}
    if group_size is not None:
        changes["group_size"] = group_size
    cfg = cfg.replace(**changes)
    x_train = load_data(flow.config) if cfg.generation_fraction < 1 else None
    model = distill(flow, cfg, x_train=x_train, callback=callback, net_factory=net_factory)
    name = f"distilled-k{cfg.steps_per_block}" + (f"-m{cfg.group_size}" if cfg.group_size > 1 else "")
    name += f"-w{cfg.width}" if cfg.width is not None else ""
    return model.save(run_dir / name)
