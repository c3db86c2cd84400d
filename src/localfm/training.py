"""Block-wise training of a Local Flow Matching chain.

For each block n (data side first): draw pairs ``x_l ~ p_{n-1}`` (the pool) and
``x_r = e^{-h_n} x_l + sqrt(1 - e^{-2 h_n}) z``; regress ``v_n(I_t, t)`` onto ``dI_t/dt``; then
push the whole pool through the trained block. The pushed pool is the next block's data.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import FlowConfig, TrainConfig, load_config
from .flow import Block, LocalFlow, Standardizer, check_data
from .interpolants import get_interpolant
from .nets import build_net
from .ode import SolverConfig
from .schedules import ou_step

__all__ = ["fit", "Progress", "TrainingDivergedError", "train_block", "push", "draw_pairs", "BlockState"]

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


def draw_pairs(pool: Tensor, h: float | None, tc: TrainConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A minibatch of block pairs ``(x_l, x_r)``; ``h = None`` is the free block (``x_r = z``)."""
    n = pool.shape[0]
    idx = torch.randint(n, (tc.batch_size,), generator=generator, device=pool.device)
    x_l = pool[idx]
    z = torch.randn(x_l.shape, generator=generator, device=pool.device, dtype=pool.dtype)
    if h is None:
        return x_l, z
    if tc.pairing == "dependent":
        src = x_l
    elif tc.pairing == "shuffled":
        src = x_l[torch.randperm(tc.batch_size, generator=generator, device=pool.device)]
    else:
        src = pool[torch.randint(n, (tc.batch_size,), generator=generator, device=pool.device)]
    return x_l, ou_step(src, h, z)


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


def new_block_state(net: nn.Module, tc: TrainConfig) -> BlockState:
    opt = torch.optim.Adam(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
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
) -> BlockState:
    """Flow matching for one block: ``min E || v(I_t, t) - dI_t/dt ||^2`` over OU pairs from ``pool``.

    Runs from ``state.step`` to ``steps`` or until ``time.monotonic()`` passes ``deadline``.
    ``report(state, mean_loss, samples_per_s)`` is called every ``tc.log_every`` steps and
    ``checkpoint(state)`` every ``tc.checkpoint_every`` steps (after the finiteness check).
    """
    net, opt = state.net, state.optimizer
    interp, times = get_interpolant(tc.interpolant), tc.time_sampler()
    params = [p for p in net.parameters() if p.requires_grad]
    ema_list = [state.ema[k] for k, p in net.named_parameters() if p.requires_grad] if state.ema else None
    K = tc.draws_per_pair
    loss_sum, since, t_mark = torch.zeros((), device=pool.device, dtype=pool.dtype), 0, time.perf_counter()
    budget_start, clock_start = state.seconds, time.monotonic()
    began = clock_start - budget_start  # when this block would have started, had it never stopped
    net.train()
    while state.step < steps and time.monotonic() < deadline:
        # Under a time budget the cosine schedule follows the share of the block's time used.
        progress = (time.monotonic() - began) / max(deadline - began, 1e-9) if math.isfinite(deadline) else None
        for group in opt.param_groups:
            group["lr"] = tc.lr * lr_factor(state.step, steps, tc, progress)

        x_l, x_r = draw_pairs(pool, h, tc, generator)
        if K > 1:
            x_l, x_r = x_l.repeat(K, *[1] * (x_l.dim() - 1)), x_r.repeat(K, *[1] * (x_r.dim() - 1))
        t = times.sample(x_l.shape[0], generator=generator, device=pool.device, dtype=pool.dtype)
        loss = (net(interp.x_t(x_l, x_r, t), t) - interp.dx_t(x_l, x_r, t)).pow(2).mean()

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

        at_end = state.step >= steps or time.monotonic() >= deadline
        save_now = checkpoint is not None and tc.checkpoint_every and state.step % tc.checkpoint_every == 0
        if state.step % tc.log_every == 0 or at_end or save_now:  # never checkpoint what has diverged
            _check_finite(float(loss_sum) / since, params, state.step)
        if state.step % tc.log_every == 0 or at_end:
            mean_loss = float(loss_sum) / since
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
) -> Tensor:
    """``T_n`` applied to every point of ``pool`` (data side to noise side), in batches.

    Raises :class:`TrainingDivergedError` if a pushed point is not finite.
    """
    out = torch.empty_like(pool)
    for i in range(0, pool.shape[0], batch_size):
        out[i : i + batch_size] = block.forward(pool[i : i + batch_size], solver=solver).x
        if progress is not None:
            progress(min(i + batch_size, pool.shape[0]), pool.shape[0])
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
        total = sum(steps)
        self.cumulative = [sum(steps[: n + 1]) / total for n in range(len(steps))]
        self.start = time.monotonic() - already_used

    def restart(self, already_used: float = 0.0) -> None:
        """Start the clock now (after one-time set-up such as the first optimiser)."""
        self.start = time.monotonic() - already_used

    def used(self) -> float:
        return time.monotonic() - self.start

    def deadline(self, n: int, push_estimate: float) -> float:
        if self.seconds is None:
            return math.inf
        return self.start + self.seconds * self.cumulative[n] - push_estimate


def _estimate_push(block_net: nn.Module, h: float | None, pool: Tensor, cfg: FlowConfig) -> float:
    """Seconds to push the pool, from a timed push of a small slice (networks at init are close)."""
    m = min(2048, pool.shape[0])
    t0 = time.perf_counter()
    push(Block(block_net, h), pool[:m], cfg.solver, cfg.train.push_batch_size)
    return (time.perf_counter() - t0) * pool.shape[0] / m


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available; use device: cpu")
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

    def callbacks(self, deadline: float) -> dict:
        """The ``deadline``, ``report`` and ``checkpoint`` arguments of :func:`train_block`."""
        return {
            "deadline": deadline,
            "report": self.report(deadline),
            "checkpoint": self.checkpoint if self.ckpt else None,
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
        self.ckpt.save(self.flow, self.n, self.pool, self.generator, self.budget.used(), s)

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

    Returns:
        The trained :class:`LocalFlow`, with ``training_log`` filled in.
    """
    from . import runstate  # checkpoint I/O of training state

    cfg = load_config(config)
    seed = cfg.seed if seed is None else seed
    if resume and run_dir is None:
        raise ValueError("resume=True needs run_dir= (the folder holding the checkpoints)")
    device = resolve_device(cfg.device)
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    x = check_data(x_train, "x_train").to(device, dtype)
    if x.shape[0] < 2 or x[0].numel() == 0:
        raise ValueError(f"x_train needs at least 2 points with at least one coordinate, got shape {tuple(x.shape)}")
    hs = cfg.blocks.steps()
    steps = cfg.train.steps_for(len(hs))
    dim = x.shape[1] if x.dim() == 2 else tuple(x.shape[1:])

    flow = LocalFlow(x.shape[1:], [], Standardizer.fit(x, per_coordinate=x.dim() == 2), cfg.solver, cfg).to(device)
    pool = flow.standardizer(x)
    generator = torch.Generator(device).manual_seed(seed)
    first_block, state, used = 0, None, 0.0
    saved = (
        runstate.latest(Path(run_dir), cfg, x.shape, net_factory=net_factory, device=device, dtype=dtype)
        if resume
        else None
    )
    if saved is not None:
        flow, first_block, used, state = saved.flow, saved.block, saved.elapsed, saved.block_state
        pool = saved.pool.to(device, dtype) if saved.pool is not None else pool
        generator.set_state(saved.generator_state)
        log.info("resuming from %s: block %d, step %d", saved.path.name, first_block, saved.step)
    ckpt = runstate.Checkpointer(Path(run_dir), cfg, resumed_from=saved) if run_dir is not None else None
    budget = TimeBudget(time_budget, steps, already_used=used)

    def emit(**kw) -> None:
        if callback is not None:
            callback(Progress(n_blocks=len(hs), elapsed=budget.used(), **kw))

    def start_block(n: int) -> BlockState:
        """Block n starts from block n-1's weights (warm start) or from a fresh network."""
        warm = cfg.train.warm_start and n > 0
        net = copy.deepcopy(flow.blocks[n - 1].net) if warm else fresh_net(dim, cfg, seed + n, net_factory)
        return new_block_state(net.to(device, dtype), cfg.train)

    for n in range(first_block, len(hs)):  # data -> noise, one block at a time
        state = state or start_block(n)
        if n == first_block:
            budget.restart(used)
        hooks = _BlockHooks(n, steps[n], cfg, emit, ckpt, flow, pool, generator, budget)
        deadline = budget.deadline(n, _estimate_push(state.net, hs[n], pool, cfg) if time_budget else 0.0)
        try:
            train_block(state, pool, hs[n], cfg.train, steps[n], generator=generator, **hooks.callbacks(deadline))
            flow.append(Block(state.net, hs[n]))
            t0 = time.perf_counter()
            pool = push(flow.blocks[n], pool, cfg.solver, cfg.train.push_batch_size, hooks.push_progress)
        except TrainingDivergedError as err:
            raise err.at(n, ckpt.last if ckpt else None) from None
        flow.training_log.append(hooks.record(hs[n], state, time.perf_counter() - t0))
        state = None
        if ckpt is not None:
            ckpt.save(flow, n + 1, pool, generator, budget.used(), None)
    emit(phase="done", block=len(hs) - 1, step=len(hs), steps=len(hs))
    return flow.eval()
