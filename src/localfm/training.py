"""Block-wise training of a Local Flow Matching chain.

For each block n (data side first): draw pairs ``x_l ~ p_{n-1}`` (the pool) and
``x_r = e^{-h_n} x_l + sqrt(1 - e^{-2 h_n}) z``; regress ``v_n(I_t, t)`` onto ``dI_t/dt``; then
push the whole pool through the trained block. The pushed pool is the next block's data.

Under torchrun (:mod:`localfm.distributed`) every rank runs this same code: each block trains with
DistributedDataParallel on ``batch_size / world_size`` pairs per rank, the pushforward is shared out
and gathered, and rank 0 alone writes checkpoints. ``train.parallel_blocks`` trains the OU blocks
against the exact OU marginals instead, side by side on different ranks (:mod:`localfm.parallel`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from . import distributed
from .config import FlowConfig, TrainConfig, load_config
from .flow import Block, LocalFlow, Standardizer, check_context, check_data
from .interpolants import get_interpolant
from .nets import build_net
from .ode import SolverConfig
from .pools import DiskPools, PoolFile, wants_disk
from .schedules import ou_step

__all__ = [
    "fit",
    "Progress",
    "TrainingDivergedError",
    "train_block",
    "push",
    "draw_pairs",
    "pairs_at",
    "BlockState",
    "flush_denormals",
]

log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss, the parameters or the pushed pool became non-finite; the last good checkpoint is kept.

    ``block`` (0-based like :attr:`Progress.block`; the message counts from 1 like the CLI) and
    ``step`` say where (``step=None``: in the pushforward); ``checkpoint`` is the last good
    checkpoint (or ``None``).
    """

    def __init__(self, what: str, step: int | None, block: int | None = None, checkpoint: Path | None = None) -> None:
        self.what, self.step, self.block, self.checkpoint = what, step, block, checkpoint
        where = f"block {block + 1}" if block is not None else "this block"
        where += f" at step {step}" if step is not None else " in the pushforward after training"
        kept = (
            f"then resume (resume=True / --resume): the last good checkpoint {checkpoint} is kept"
            if checkpoint is not None
            else "train with run_dir= and train.checkpoint_every to keep checkpoints to resume from"
        )
        super().__init__(
            f"training diverged in {where}: {what}. Lower train.lr, set train.grad_clip "
            f"(e.g. 1.0) or add train.warmup steps, {kept}"
        )

    def at(self, block: int, checkpoint: Path | None) -> TrainingDivergedError:
        return TrainingDivergedError(self.what, self.step, block, checkpoint)


@dataclass
class Progress:
    """What ``fit`` reports to its callback.

    ``phase`` is ``"train"`` (``step`` of ``steps``, ``loss`` averaged since the last report) or
    ``"push"`` (``step`` points of ``steps`` pushed through block ``block``), or ``"done"``.
    """

    phase: str
    block: int
    n_blocks: int
    step: int
    steps: int
    loss: float = math.nan
    lr: float = math.nan
    samples_per_s: float = math.nan
    elapsed: float = 0.0
    eta: float = math.nan


@dataclass
class BlockState:
    """Everything needed to continue training one block exactly where it stopped."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    ema: dict[str, Tensor] | None
    step: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0


def draw_pairs(
    pool: Tensor, h: float | None, tc: TrainConfig, generator: torch.Generator, batch_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """A minibatch of block pairs ``(x_l, x_r)``; ``h = None`` is the free block (``x_r = z``).

    ``batch_size`` (default ``tc.batch_size``) is this rank's share of the batch under torchrun.
    """
    b = batch_size or tc.batch_size
    idx = torch.randint(pool.shape[0], (b,), generator=generator, device=generator.device)
    return pairs_at(pool, idx, h, tc, generator)


def pairs_at(pool: Tensor, idx: Tensor, h: float | None, tc: TrainConfig, generator: torch.Generator):
    """The block pairs ``(x_l, x_r)`` of the pool rows ``idx`` (see :func:`draw_pairs`).

    A conditional flow draws ``idx`` itself, so that it can take the same rows of the context.
    The pairs are on the generator's device, wherever the pool is (a pool on disk is on the host).
    """
    n, b, device = pool.shape[0], idx.shape[0], generator.device
    x_l = rows(pool, idx)
    z = torch.randn(x_l.shape, generator=generator, device=device, dtype=pool.dtype)
    if h is None:
        return x_l, z
    if tc.pairing == "dependent":
        src = x_l
    elif tc.pairing == "shuffled":
        src = x_l[torch.randperm(b, generator=generator, device=device)]
    else:
        src = rows(pool, torch.randint(n, (b,), generator=generator, device=device))
    return x_l, ou_step(src, h, z)


def rows(pool: Tensor, idx: Tensor) -> Tensor:
    """``pool[idx]`` on ``idx``'s device: a pool kept on the host (on disk) is gathered there and moved."""
    if pool.device == idx.device:
        return pool[idx]
    return pool[idx.to(pool.device)].to(idx.device, non_blocking=True)


def lr_factor(step: int, steps: int, tc: TrainConfig, progress: float | None = None) -> float:
    """Learning-rate multiplier at ``step`` (warm-up, then the schedule).

    ``progress`` in [0, 1] replaces ``step / steps`` for the cosine schedule under a time budget.
    """
    if step < tc.warmup:
        return (step + 1) / tc.warmup
    if tc.lr_schedule == "step":
        return tc.gamma ** ((step - tc.warmup) // tc.step_size)
    if tc.lr_schedule == "cosine":
        p = progress if progress is not None else (step - tc.warmup) / max(1, steps - tc.warmup)
        p = min(max(p, 0.0), 1.0)
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    return 1.0


def make_optimizer(net: nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """Adam over the network's parameters; the fused kernel where the device has one.

    Fused Adam measured 1.07-1.16x faster per training step on CPU (benchmarks/results/core.md).
    """
    params = list(net.parameters())
    try:
        return torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=True)
    except (RuntimeError, TypeError):  # a device or dtype without a fused kernel
        return torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay)


def new_block_state(net: nn.Module, tc: TrainConfig) -> BlockState:
    opt = make_optimizer(net, tc)
    ema = {k: v.detach().clone() for k, v in net.named_parameters()} if tc.ema else None
    return BlockState(net, opt, ema)


def train_block(
    state: BlockState,
    pool: Tensor,
    h: float | None,
    tc: TrainConfig,
    steps: int,
    *,
    generator: torch.Generator,
    deadline: float = math.inf,
    report: Callable[[BlockState, float, float], None] | None = None,
    checkpoint: Callable[[BlockState], None] | None = None,
    pairs: Callable[[int, torch.Generator], tuple[Tensor, Tensor]] | None = None,
    data_parallel: bool = True,
    context: Tensor | None = None,
) -> BlockState:
    """Flow matching for one block: ``min E || v(I_t, t) - dI_t/dt ||^2`` over OU pairs from ``pool``.

    Runs from ``state.step`` to ``steps`` or until ``time.monotonic()`` passes ``deadline``.
    ``report(state, mean_loss, samples_per_s)`` is called every ``tc.log_every`` steps and
    ``checkpoint(state)`` every ``tc.checkpoint_every`` steps (after the finiteness check).
    ``pairs(batch_size, generator) -> (x_l, x_r)`` replaces :func:`draw_pairs` from ``pool``.

    Under torchrun all ranks train the block together (``data_parallel``): the network is wrapped
    in DistributedDataParallel, each rank draws ``tc.batch_size / world_size`` pairs from its own
    ``generator``, losses are averaged over ranks and rank 0's clock decides when a deadline is
    past. ``data_parallel=False``: this rank trains the block alone on the whole batch.

    ``context`` (N, c), row-aligned with ``pool``, conditions the network: ``v(I_t, t, c)``. With
    ``tc.context_dropout = p`` each pair's context is replaced by the network's learned
    ``null_context`` with probability p, for classifier-free guidance at sampling.
    """
    net, opt = state.net, state.optimizer
    shared = data_parallel and distributed.world().size > 1
    model = distributed.wrap(net) if shared else net
    batch = distributed.local_batch_size(tc.batch_size) if shared else tc.batch_size
    draw = _pair_drawer(pool, h, tc, pairs, context)
    null = _null_context(net, tc) if context is not None else None
    interp, times = get_interpolant(tc.interpolant), tc.time_sampler()
    params = [p for p in net.parameters() if p.requires_grad]
    ema_list = [state.ema[k] for k, p in net.named_parameters() if p.requires_grad] if state.ema else None
    K = tc.draws_per_pair
    device = generator.device  # where the pairs are made and the network trains (the pool may be on disk)
    amp = tc.amp and device.type == "cuda"  # bfloat16 autocast: no loss scaling needed
    if tc.amp and not amp:
        log.info("train.amp is ignored on %s: mixed precision runs on CUDA only", device.type)
    loss_sum, since, t_mark = torch.zeros((), device=device, dtype=pool.dtype), 0, time.perf_counter()
    budget_start, clock_start = state.seconds, time.monotonic()
    began = clock_start - budget_start  # when this block would have started, had it never stopped
    net.train()
    progress, late = _clock(began, deadline, shared)
    while state.step < steps and not late:
        # Under a time budget the cosine schedule follows the share of the block's time used.
        for group in opt.param_groups:
            group["lr"] = tc.lr * lr_factor(state.step, steps, tc, progress)

        x_l, x_r, c = draw(batch, generator)
        if K > 1:
            x_l, x_r = x_l.repeat(K, *[1] * (x_l.dim() - 1)), x_r.repeat(K, *[1] * (x_r.dim() - 1))
            c = c.repeat(K, 1) if c is not None else None
        t = times.sample(x_l.shape[0], generator=generator, device=device, dtype=pool.dtype)
        if null is not None:
            drop = torch.rand(c.shape[0], generator=generator, device=c.device, dtype=c.dtype) < tc.context_dropout
            c = torch.where(drop[:, None], null.to(c.dtype).expand_as(c), c)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            x_t = interp.x_t(x_l, x_r, t)
            v = model(x_t, t) if c is None else model(x_t, t, c)
        loss = (v.to(x_l.dtype) - interp.dx_t(x_l, x_r, t)).pow(2).mean()

        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        if ema_list is not None:
            decay = min(tc.ema, (1 + state.step) / (10 + state.step))
            torch._foreach_lerp_(ema_list, [p.detach() for p in params], 1 - decay)
        state.step += 1
        loss_sum += loss.detach()
        since += 1

        progress, late = _clock(began, deadline, shared)
        at_end = state.step >= steps or late
        save_now = checkpoint is not None and tc.checkpoint_every and state.step % tc.checkpoint_every == 0
        if state.step % tc.log_every == 0 or at_end or save_now:  # never checkpoint what has diverged
            mean_loss = float(distributed.all_mean(loss_sum) if shared else loss_sum) / since
            _check_finite(mean_loss, params, state.step)
        if state.step % tc.log_every == 0 or at_end:
            now = time.perf_counter()
            rate = since * tc.batch_size * K / max(now - t_mark, 1e-9)
            state.seconds = budget_start + time.monotonic() - clock_start
            state.losses.append((state.step, mean_loss))
            if report is not None:
                report(state, mean_loss, rate)
            loss_sum.zero_()
            since, t_mark = 0, now
        if save_now and not at_end:
            state.seconds = budget_start + time.monotonic() - clock_start
            checkpoint(state)
    state.seconds = budget_start + time.monotonic() - clock_start
    net.eval()
    if state.ema is not None:
        # The averaged weights are the block's weights from here on (pushforward, warm start).
        with torch.no_grad():
            for k, p in net.named_parameters():
                if k in state.ema:
                    p.copy_(state.ema[k])
    return state


def _pair_drawer(pool: Tensor, h: float | None, tc: TrainConfig, pairs, context: Tensor | None):
    """``(batch_size, generator) -> (x_l, x_r, c)``: ``c`` holds the context rows of ``x_l`` (or ``None``)."""
    if pairs is not None:
        if context is not None:
            raise ValueError("train_block: pairs= and context= cannot be combined (pairs carry no context)")
        return lambda b, g: (*pairs(b, g), None)
    if context is None:
        return lambda b, g: (*draw_pairs(pool, h, tc, g, batch_size=b), None)

    def draw(b: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        idx = torch.randint(pool.shape[0], (b,), generator=g, device=g.device)
        return (*pairs_at(pool, idx, h, tc, g), context[idx])

    return draw


def _null_context(net: nn.Module, tc: TrainConfig) -> Tensor | None:
    """The learned context that replaces dropped ones (``tc.context_dropout``), or ``None`` without dropout."""
    if not tc.context_dropout:
        return None
    null = getattr(net, "null_context", None)
    if not isinstance(null, Tensor):
        raise ValueError(
            f"train.context_dropout is {tc.context_dropout} but the network has no null_context "
            "(a learned context for classifier-free guidance): use the built-in MLP or give your network one"
        )
    return null


def _clock(began: float, deadline: float, shared: bool) -> tuple[float | None, bool]:
    """The share of the block's time used and whether ``deadline`` is past (``None, False`` without one).

    With ``shared``, every rank takes rank 0's reading, so that all stop at the same step.
    """
    if not math.isfinite(deadline):
        return None, False
    now = time.monotonic()
    progress, late = (now - began) / max(deadline - began, 1e-9), float(now >= deadline)
    if shared:
        progress, late = distributed.from_main([progress, late])
    return progress, bool(late)


def _check_finite(mean_loss: float, params: list[Tensor], step: int) -> None:
    if not math.isfinite(mean_loss):
        raise TrainingDivergedError(f"the loss is {mean_loss}", step)
    if not all(torch.isfinite(p).all() for p in params):
        raise TrainingDivergedError("the network's parameters are not finite", step)


@torch.no_grad()
def push(
    block: Block,
    pool: Tensor,
    solver: SolverConfig,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
    context: Tensor | None = None,
    *,
    subset: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """``T_n`` applied to every point of ``pool`` (data side to noise side), in batches.

    ``context`` (N, c), row-aligned with ``pool``, conditions the block; it is not transported.
    ``subset`` (indices into ``pool``) pushes only those rows, in that order. ``out`` receives the
    result (a pool being written to disk, see :mod:`localfm.pools`); each batch is moved to the
    block's device, pushed and written back, so a pool on disk is never held in memory whole.

    Under torchrun each rank pushes its contiguous share of the pool and every rank receives the
    whole result; ``progress(done, total)`` then estimates ``done`` from this rank's share.
    Raises :class:`TrainingDivergedError` if a pushed point is not finite.
    """
    if distributed.world().size > 1:
        if subset is not None or out is not None:
            raise ValueError("push: subset= and out= (pools on disk) are for a single process, not torchrun")
        return _push_sharded(block, pool, solver, batch_size, progress, context)
    total = pool.shape[0] if subset is None else subset.shape[0]
    device = next(block.parameters(), pool).device
    dest = torch.empty((total, *pool.shape[1:]), dtype=pool.dtype, device=device) if out is None else out
    for i in range(0, total, batch_size):
        sel = slice(i, i + batch_size) if subset is None else subset[i : i + batch_size]
        ctx = None if context is None else context[sel].to(device)
        y = block.forward(pool[sel].to(device), solver=solver, context=ctx).x
        if not torch.isfinite(y).all():
            raise TrainingDivergedError("pushing the data through the trained block gave non-finite points", None)
        dest[i : i + y.shape[0]] = y.to(dest.device)
        if progress is not None:
            progress(min(i + batch_size, total), total)
    return dest


def _push_sharded(block: Block, pool: Tensor, solver, batch_size: int, progress, context: Tensor | None) -> Tensor:
    """:func:`push` under torchrun: each rank its share, the whole pool gathered on every rank."""
    total, ranks = pool.shape[0], distributed.world().size
    width = pool[0].numel()

    def push_share(share: Tensor) -> Tensor:
        # With a context, each row of ``share`` is a point and its context side by side.
        x, c = (share, None) if context is None else (share[:, :width].reshape(-1, *pool.shape[1:]), share[:, width:])
        out = torch.empty_like(x)
        for i in range(0, x.shape[0], batch_size):
            ctx = None if c is None else c[i : i + batch_size]
            out[i : i + batch_size] = block.forward(x[i : i + batch_size], solver=solver, context=ctx).x
            if progress is not None:
                progress(min(min(i + batch_size, x.shape[0]) * ranks, total), total)
        return out if context is None else torch.cat([out.flatten(1), c], dim=1)

    rows = pool if context is None else torch.cat([pool.flatten(1), context.to(pool.dtype)], dim=1)
    out = distributed.map_sharded(push_share, rows)
    if context is not None:
        out = out[:, :width].reshape(pool.shape)
    if not torch.isfinite(out).all():
        raise TrainingDivergedError("pushing the data through the trained block gave non-finite points", None)
    return out


class TimeBudget:
    """Wall-clock budget shared among blocks in proportion to their steps, pushforward included.

    Block n must finish (training and push) by ``start + budget * cumulative_share(n)``; time a
    block leaves unused passes on to the blocks after it.
    """

    def __init__(self, seconds: float | None, steps: list[int], already_used: float = 0.0) -> None:
        if seconds is not None and not seconds > 0:
            raise ValueError(f"time_budget must be a number of seconds > 0, got {seconds!r}")
        self.seconds = seconds
        total = max(sum(steps), 1)
        self.cumulative = [sum(steps[: n + 1]) / total for n in range(len(steps))]
        self.start = time.monotonic() - already_used

    def restart(self, already_used: float = 0.0) -> None:
        """Start the clock now (after one-time set-up such as the first optimiser)."""
        self.start = time.monotonic() - already_used

    def used(self) -> float:
        return time.monotonic() - self.start

    def deadline(self, n: int, push_estimate: float) -> float:
        """When block n must stop training so that its push ends on its share of the budget.

        A block always gets at least a quarter of its own share for training: when the push is
        estimated to take more than that, the run overshoots the budget (with a warning) rather
        than leaving blocks untrained.
        """
        if self.seconds is None:
            return math.inf
        share = self.seconds * (self.cumulative[n] - (self.cumulative[n - 1] if n else 0.0))
        end = self.start + self.seconds * self.cumulative[n] - push_estimate
        floor = time.monotonic() + 0.25 * share
        if end < floor:
            log.warning(
                "block %d: the pushforward (about %.0f s) leaves too little of the time budget for training; "
                "use a cheaper solver (e.g. solver.method: rk4 with fewer steps), a smaller pool or a larger budget",
                n,
                push_estimate,
            )
        return max(end, floor)


def _estimate_push(
    block_net: nn.Module, h: float | None, pool: Tensor, cfg: FlowConfig, n: int, context: Tensor | None = None
) -> float:
    """Seconds to push the pool, from a timed push of a small slice (networks at init are close).

    The slice is at most one push batch: for UNets on a CPU, 2,048 images already cost minutes.
    """
    m = min(2048, pool.shape[0], cfg.train.push_batch_size)
    t0 = time.perf_counter()
    push(
        Block(block_net, h),
        pool[:m],
        cfg.solver.for_block(n),
        cfg.train.push_batch_size,
        context=None if context is None else context[:m],
    )
    return (time.perf_counter() - t0) * pool.shape[0] / m


def _pushed_subset(n: int, push_points: int | None, seed: int, device) -> Tensor | None:
    """Rows of the training set that ``train.push_points`` keeps (``None``: all), fixed by ``seed``."""
    if push_points is None or push_points >= n:
        return None
    g = torch.Generator().manual_seed(seed + 7919)  # its own stream: minibatch draws stay as they were
    return torch.randperm(n, generator=g)[:push_points].sort().values.to(device)


def resolve_device(name: str) -> torch.device:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available; use device: cpu")
    w = distributed.world()
    if device.type == "cuda" and w.size > 1:
        device = torch.device("cuda", w.local_rank)  # one GPU per process, whatever index the config names
    return device


def fresh_net(dim, cfg: FlowConfig, seed: int, net_factory=None) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return (net_factory or (lambda d, c: build_net(d, c.net)))(dim, cfg)


@dataclass
class _BlockHooks:
    """Progress reports, checkpoints and the training record of block ``n`` inside ``fit``."""

    n: int
    steps: int
    cfg: FlowConfig
    emit: Callable[..., None]
    ckpt: object
    flow: LocalFlow
    pool: Tensor
    generator: torch.Generator
    budget: TimeBudget
    pool_file: PoolFile | None = None  # the pool's file when it is on disk

    def callbacks(self, deadline: float) -> dict:
        """The ``deadline``, ``report`` and ``checkpoint`` arguments of :func:`train_block`."""
        return {
            "deadline": deadline,
            "report": self.report(deadline),
            # Under torchrun every rank passes the checkpoints (rank 0 alone writes): see resync.
            "checkpoint": self.checkpoint if self.ckpt or distributed.world().size > 1 else None,
        }

    def report(self, deadline: float) -> Callable[[BlockState, float, float], None]:
        tc = self.cfg.train

        def report(s: BlockState, loss: float, rate: float) -> None:
            left = (self.steps - s.step) * tc.batch_size * tc.draws_per_pair / max(rate, 1e-9)
            if math.isfinite(deadline):
                left = min(left, max(0.0, deadline - time.monotonic()))
            lr = s.optimizer.param_groups[0]["lr"]
            self.emit(
                phase="train",
                block=self.n,
                step=s.step,
                steps=self.steps,
                loss=loss,
                lr=lr,
                samples_per_s=rate,
                eta=left,
            )

        return report

    def checkpoint(self, s: BlockState) -> None:
        if self.ckpt:
            self.ckpt.save(self.flow, self.n, self.pool, self.generator, self.budget.used(), s, self.pool_file)
        distributed.resync(self.generator)

    def push_progress(self, done: int, total: int) -> None:
        self.emit(phase="push", block=self.n, step=done, steps=total)

    def record(self, h: float | None, s: BlockState, push_seconds: float) -> dict:
        return {
            "block": self.n,
            "h": h,
            "steps": s.step,
            "train_seconds": s.seconds,
            "push_seconds": push_seconds,
            "losses": s.losses,
        }


def _flushing() -> bool:
    """Whether the CPU now treats subnormal floats as zero (a subnormal survives a multiply otherwise)."""
    return torch.tensor([1e-40], dtype=torch.float32).mul(1.0).item() == 0.0


@contextlib.contextmanager
def flush_denormals(on: bool = True):
    """Within the block, the CPU treats subnormal floats as zero (x86 FTZ/DAZ), then goes back.

    softplus with a sharp ``beta`` (20, the default) sends ever more pre-activations to values
    below float32's smallest normal number as training goes on, and an x86 core handles each
    operation on those many times slower: a 2-D block's training fell from 222 to 132 steps/s in
    5,000 steps, and held 233-238 steps/s with the same losses when they were flushed
    (``benchmarks/bench_core.py --only subnormals``). :func:`fit` runs under this. The setting is
    per thread and affects CPU arithmetic only.
    """
    was = _flushing()
    torch.set_flush_denormal(on)
    try:
        yield
    finally:
        torch.set_flush_denormal(was)


@flush_denormals()
def fit(
    x_train,
    config: FlowConfig | str | Path | dict | None = None,
    *,
    time_budget: float | None = None,
    seed: int | None = None,
    callback: Callable[[Progress], None] | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    net_factory: Callable | None = None,
    context=None,
) -> LocalFlow:
    """Train a Local Flow Matching chain on ``x_train`` (N, d) or (N, C, H, W), in data units.

    Args:
        x_train: training points (array or tensor); standardised inside the model.
        config: :class:`~localfm.config.FlowConfig`, a YAML path, a dict, or ``None`` for defaults.
        time_budget: wall-clock seconds for the whole run, shared among blocks in proportion to
            their steps, pushforward included (each block still stops at its step count).
        seed: seeds network initialisation and every minibatch and noise draw (default ``config.seed``).
        callback: called with :class:`Progress` while training and pushing.
        run_dir: folder for checkpoints (block boundaries and every ``train.checkpoint_every`` steps).
        resume: continue from the newest good checkpoint in ``run_dir``.
        net_factory: ``(dim, config) -> nn.Module`` for custom velocity networks.
        context: (N, c) conditioning vectors, row ``i`` belonging to ``x_train[i]`` (a conditional
            flow: ``net.context_dim = c``; networks are called as ``net(x, t, context)``). The OU
            blocks act on ``x`` only; each pool row keeps its context. Pass the same context again
            with ``resume=True``. ``train.context_dropout`` trains for classifier-free guidance.

    Returns:
        The trained :class:`LocalFlow`, with ``training_log`` filled in.

    Under torchrun, after :func:`localfm.distributed.init`, call ``fit`` on every rank with the same
    arguments (pass ``callback`` on rank 0 only): blocks train with DDP on the global batch, rank 0
    alone writes checkpoints, and every rank returns the same flow (see :mod:`localfm.distributed`).
    """
    from . import runstate  # checkpoint I/O of training state

    cfg = load_config(config)
    seed = cfg.seed if seed is None else seed
    if resume and run_dir is None:
        raise ValueError("resume=True needs run_dir= (the folder holding the checkpoints)")
    world = distributed.world()
    distributed.local_batch_size(cfg.train.batch_size, world)  # the global batch must split evenly
    if time_budget is not None and cfg.train.parallel_blocks:
        raise ValueError("time_budget cannot be shared out with train.parallel_blocks: true; give train.steps instead")
    device = resolve_device(cfg.device)
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    x = check_data(x_train, "x_train")
    if cfg.train.pool_storage == "disk" and world.size > 1:
        raise ValueError("train.pool_storage: disk runs in one process; under torchrun use device (or auto)")
    on_disk = world.size == 1 and wants_disk(cfg.train.pool_storage, tuple(x.shape), dtype, device)
    x = x if on_disk else x.to(device, dtype)  # on disk, the data stay where they are and go through in batches
    if x.shape[0] < 2 or x[0].numel() == 0:
        raise ValueError(f"x_train needs at least 2 points with at least one coordinate, got shape {tuple(x.shape)}")
    hs = cfg.blocks.steps()
    steps = cfg.train.sequential_steps(hs)
    dim = x.shape[1] if x.dim() == 2 else tuple(x.shape[1:])
    # A custom network's context size is its own business: only the rows are checked then.
    c_dim = cfg.net.context_dim if net_factory is None else (0 if context is None else np.shape(context)[-1])
    c = check_context(context, x.shape[0], c_dim, "context")
    c = c.to(device, dtype) if c is not None else None
    if c is not None and cfg.train.parallel_blocks:
        raise ValueError("train.parallel_blocks does not support conditional flows (context=); train block by block")

    flow = LocalFlow(x.shape[1:], [], Standardizer.fit(x, per_coordinate=x.dim() == 2), cfg.solver, cfg).to(device)
    writes = run_dir is not None and world.is_main  # rank 0 alone writes checkpoints
    disk = DiskPools(Path(run_dir) / "checkpoints" if writes else None) if on_disk else None
    pool, pool_file = (flow.standardizer(x), None) if disk is None else (None, None)  # on disk: below
    generator = torch.Generator(device).manual_seed(seed)
    first_block, state, used = 0, None, 0.0
    saved = (
        runstate.latest(Path(run_dir), cfg, x.shape, net_factory=net_factory, device=device, dtype=dtype)
        if resume
        else None
    )
    keep = _pushed_subset(x.shape[0], cfg.train.push_points, seed, device)
    if saved is not None:
        flow, first_block, used, state = saved.flow, saved.block, saved.elapsed, saved.block_state
        if saved.pool is not None:
            if disk is None:
                pool = saved.pool.to(device, dtype)
            else:
                pool, pool_file = disk.adopt(saved.pool, saved.pool_file, saved.block)
        if first_block > 0 and keep is not None and c is not None:
            c = c[keep]  # the saved pool holds the pushed subset's rows
        generator.set_state(saved.generator_state)
        log.info("resuming from %s: block %d, step %d", saved.path.name, first_block, saved.step)
    if world.size > 1:
        where = distributed.all_gather_object(None if saved is None else (saved.block, saved.step))
        if len(set(where)) > 1:
            raise ValueError(
                f"the ranks found different checkpoints to resume from ((block, step) per rank: {where}); "
                "every rank reads run_dir: put it on a file system that all machines share"
            )
    distributed.resync(generator)
    ckpt = runstate.Checkpointer(Path(run_dir), cfg, resumed_from=saved) if writes else None
    if pool is None:  # pool 0 on disk, the standardised data written in batches (once the folder is checked)
        pool, pool_file = disk.standardized(flow.standardizer, x, dtype)
    budget = TimeBudget(time_budget, steps, already_used=used)

    def emit(**kw) -> None:
        if callback is not None:
            callback(Progress(n_blocks=len(hs), elapsed=budget.used(), **kw))

    def start_block(n: int) -> BlockState:
        """Block n starts from its weights trained on the OU marginals (``train.parallel_blocks``),
        from block n-1's weights (warm start) or from a fresh network."""
        if n in parallel:
            net = parallel[n].net
        elif cfg.train.warm_start and n > 0:
            net = copy.deepcopy(flow.blocks[n - 1].net)
        else:
            net = fresh_net(dim, cfg, seed + n, net_factory)
        return new_block_state(net.to(device, dtype), cfg.train)

    parallel = {}  # the OU blocks still to come, trained side by side on the exact OU marginals
    if cfg.train.parallel_blocks:
        from .parallel import train_parallel_blocks

        later = range(first_block + (state is not None), len(hs))
        parallel_steps = cfg.train.steps_for(len(hs))
        parallel = train_parallel_blocks(
            flow.standardizer(x.to(device, dtype)),  # the data themselves, also when the pools are on disk
            hs,
            cfg.train,
            blocks=[n for n in later if hs[n] is not None],
            seed=seed,
            make_net=lambda n: fresh_net(dim, cfg, seed + n, net_factory).to(device, dtype),
            report=lambda n: _BlockHooks(n, parallel_steps[n], cfg, emit, None, flow, pool, generator, budget).report(
                math.inf
            ),
        )

    push_s = None  # seconds one pushforward of the pool takes, for the time budget
    for n in range(first_block, len(hs)):  # data -> noise, one block at a time
        state = state or start_block(n)
        if n == first_block:
            budget.restart(used)
        hooks = _BlockHooks(n, steps[n], cfg, emit, ckpt, flow, pool, generator, budget, pool_file)
        last = n + 1 == len(hs)  # nothing trains on the pool after the last block: no push
        if time_budget and not last and push_s is None:  # later blocks use the last push measured
            pushed = len(keep) if keep is not None and n == 0 else pool.shape[0]
            push_s = _estimate_push(state.net, hs[n], pool, cfg, n, c) * pushed / pool.shape[0]
        deadline = budget.deadline(n, push_s if time_budget and not last else 0.0)
        try:
            train_block(
                state, pool, hs[n], cfg.train, steps[n], generator=generator, context=c, **hooks.callbacks(deadline)
            )
            flow.append(Block(state.net, hs[n]))
            t0 = time.perf_counter()
            if not last:
                subset = keep if n == 0 else None  # from here on the pool is the chosen subset
                solver, batch = cfg.solver.for_block(n), cfg.train.push_batch_size
                if disk is None:
                    if subset is not None:
                        pool, c = pool[subset], (None if c is None else c[subset])
                    pool = push(flow.blocks[n], pool, solver, batch, hooks.push_progress, c)
                else:  # written batch by batch into the next pool's file
                    size = (len(pool) if subset is None else len(subset), *pool.shape[1:])
                    fill = partial(push, flow.blocks[n], pool, solver, batch, hooks.push_progress, c, subset=subset)
                    pool, pool_file = disk.write(n + 1, size, dtype, fill)
                    c = None if c is None else c if subset is None else c[subset]
        except TrainingDivergedError as err:
            raise err.at(n, ckpt.last if ckpt else None) from None
        record = hooks.record(hs[n], state, time.perf_counter() - t0)
        push_s = record["push_seconds"] if not last else push_s
        flow.training_log.append(parallel[n].merged(record) if n in parallel else record)
        state = None
        if ckpt is not None:
            ckpt.save(flow, n + 1, pool, generator, budget.used(), None, pool_file)
        distributed.resync(generator)
    if disk is not None:
        disk.close()
    emit(phase="done", block=len(hs) - 1, step=len(hs), steps=len(hs))
    return flow.eval()
