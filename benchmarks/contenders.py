"""The contenders of the comparison suites (issue 5), behind one interface.

Every contender is trained by :func:`train` under the **same wall-clock budget** (LFM's
pushforward included) from the same standardised training data, and evaluated by
:func:`evaluate` the same way: test NLL in nats with its standard error
(``localfm.metrics.nll_summary``), energy distance of 10k samples to 10k test points, training and
sampling time, network evaluations per sample, parameter count.

- ``LFM``: ``localfm.fit`` with the suite's LFM config (OU blocks + free block).
- ``FM``: the same code with ``blocks.L: 0`` (one free block), its MLP widened to the same total
  parameter count as LFM's blocks together (:func:`fm_twin`; both counts are recorded).
- ``torchcfm``: ``torchcfm.ConditionalFlowMatcher`` (its straight path and target, sigma = 0)
  regressing FM's MLP; likelihood and samples by localfm's ODE solver with the exact divergence,
  through the same ``LocalFlow`` machinery as LFM and FM, so the NLLs are comparable.
- ``zuko-NSF`` and ``zuko-MAF``: zuko's spline and affine masked autoregressive flows, trained by
  maximum likelihood; exact ``log_prob``.

All contenders use Adam (fused where available) with the same schedule: ``warmup`` linear steps,
then a cosine decay that follows the share of the budget used (what ``fit`` does under a time
budget). The learning rate and batch size come from a :class:`Setting`; a suite sweeps the same
small grid for every contender on a validation split and keeps each contender's best.

Installing the peers (never let pip pick torch)::

    pip install zuko                  # or: pip install -e '.[bench]'
    pip install --no-deps torchcfm    # its declared dependencies would replace torch

torchcfm imports POT (``ot``) at import time for its optimal-transport matchers; the plain
``ConditionalFlowMatcher`` used here does not need it, so when POT is absent a placeholder module
stands in for it during the import (any use of it raises).

Learning curves: :class:`Curve` evaluates a model at wall-clock checkpoints with the clock
stopped (:data:`CLOCK`), so evaluation never eats into a contender's budget; for ``fit`` the clock
of ``localfm.training`` is swapped for :data:`CLOCK` while it runs.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

import localfm
import localfm.training
from localfm import metrics, runs
from localfm.flow import Block, LocalFlow, Standardizer
from localfm.nets import NetConfig, build_net, count_parameters
from localfm.ode import SolverConfig

CONTENDERS = ("LFM", "FM", "torchcfm", "zuko-NSF", "zuko-MAF")
PACKAGES = {"torchcfm": "torchcfm", "zuko-NSF": "zuko", "zuko-MAF": "zuko"}
INSTALL = {
    "torchcfm": "pip install --no-deps torchcfm  (never without --no-deps: its dependencies replace torch)",
    "zuko": "pip install zuko  (or pip install -e '.[bench]')",
}


class MissingPackage(RuntimeError):
    """A contender's package is not installed; the message says how to install it."""


# ---------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class Setting:
    """One point of the tuning sweep."""

    lr: float
    batch_size: int
    # The architecture at the same total parameters (None: the suite's own): LFM's number of
    # blocks (the first ``blocks - 1`` OU steps + the free block); the hidden layers of each
    # network (LFM's blocks, FM's one).
    blocks: int | None = None
    depth: int | None = None

    @property
    def arch(self) -> str | None:
        parts = [f"{k}={v}" for k, v in (("blocks", self.blocks), ("depth", self.depth)) if v is not None]
        return " ".join(parts) or None

    @property
    def label(self) -> str:
        return f"lr={self.lr:g} batch={self.batch_size}" + (f" {self.arch}" if self.arch else "")


def sweep_grid(lrs=(1e-3, 3e-3), batches=(512, 2048), archs=({},)) -> list[Setting]:
    """Every learning rate x batch size x architecture (``{"blocks": 2}``, ``{"depth": 4}``, ``{}``)."""
    return [Setting(lr, b, **arch) for arch in archs for lr in lrs for b in batches]


@dataclass(frozen=True)
class Suite:
    """What a suite fixes for every contender (architectures, solver, schedule).

    ``lfm``: a localfm config dict (``net``, ``blocks``, ``solver``, optional ``train`` extras);
    FM is the same config with one free block of width ``fm_width`` (``None``: matched to LFM's
    total parameters). ``ode_solver``: the solver of the single-block ODE contenders (FM,
    torchcfm), used for their likelihood and samples; LFM's own ``solver`` serves its pushforward,
    likelihood and samples alike. ``lfm_pool``: LFM trains on (and pushes) the first ``lfm_pool``
    training points only (``None``: all). ``nsf``/``maf``: keyword arguments of zuko's flows.
    """

    lfm: dict
    ode_solver: dict
    nsf: dict
    maf: dict
    warmup: int = 0
    fm_width: int | None = None
    lfm_pool: int | None = None
    torchcfm_sigma: float = 0.0

    def lfm_config(self, setting: Setting, dim: int) -> dict:
        cfg = copy.deepcopy(self.lfm)
        if setting.blocks is not None or setting.depth is not None:
            h = cfg["blocks"].get("h", [])
            blocks = setting.blocks or n_blocks(cfg)
            if not 1 <= blocks <= len(h) + 1 or not cfg["blocks"].get("free_block", True):
                raise ValueError(f"blocks={blocks}: this suite's LFM has OU steps {h} + the free block")
            cfg = with_steps(cfg, dim, h[: blocks - 1], depth=setting.depth)
        shares = cfg.get("train", {}).get("steps")
        train = {
            # The budget decides; blocks share it equally, or in proportion to a list of steps.
            "steps": [10_000 * n for n in shares] if isinstance(shares, list) else BIG,
            "batch_size": setting.batch_size,
            "lr": setting.lr,
            "lr_schedule": "cosine",
            "warmup": self.warmup,
            "log_every": 25,
        }
        cfg["train"] = {**cfg.get("train", {}), **train}
        return cfg

    def fm_net(self, dim: int) -> dict:
        return {**self.lfm["net"], "width": self.fm_width or fm_width(dim, self.lfm)}

    def fm_config(self, setting: Setting, dim: int) -> dict:
        width = self.fm_width if setting.depth is None else None
        lfm = self.lfm_config(replace(setting, depth=None), dim)  # the depth is FM's own
        cfg = fm_twin(lfm, dim, width=width, depth=setting.depth)
        cfg["solver"] = dict(self.ode_solver)
        return cfg


def solver_spec(spec: str) -> dict:
    """``"dopri5"`` or ``"rk4:4"`` (method:steps) as a solver dict (adaptive ones at rtol = atol = 1e-5)."""
    method, _, steps = spec.partition(":")
    return {"method": method, "steps": int(steps)} if steps else {"method": method, "rtol": 1e-5, "atol": 1e-5}


BIG = 10_000_000  # optimiser steps that never bind: the wall-clock budget decides


def n_blocks(cfg: dict) -> int:
    """The number of blocks (OU blocks and the free block) of a flow config dict."""
    return len(localfm.load_config({"blocks": cfg["blocks"]}).blocks.steps())


def blocks_width(dim: int, lfm: dict, n: int, depth: int | None = None) -> int:
    """The MLP width at which ``n`` networks of ``depth`` hidden layers (default LFM's) have the
    total parameter count of LFM's blocks."""
    net = lfm["net"]
    return matched_width(dim, {**net, "depth": depth or net["depth"]}, n_blocks(lfm) * mlp_params(dim, net), copies=n)


def with_steps(lfm: dict, dim: int, h: list[float], depth: int | None = None) -> dict:
    """LFM with OU steps ``h`` (+ its free block), each block ``depth`` hidden layers deep (default
    its own) and as wide as keeps the total parameters."""
    width = blocks_width(dim, lfm, len(h) + int(lfm["blocks"].get("free_block", True)), depth)
    net = {**lfm["net"], "width": width, "depth": depth or lfm["net"]["depth"]}
    return {**lfm, "net": net, "blocks": {**lfm["blocks"], "h": list(h)}}


def fm_width(dim: int, lfm: dict, depth: int | None = None) -> int:
    """The MLP width of global FM's one network (``depth`` hidden layers, default LFM's) at the total
    parameter count of LFM's blocks."""
    return blocks_width(dim, lfm, 1, depth)


def fm_twin(lfm: dict, dim: int, width: int | None = None, depth: int | None = None) -> dict:
    """Global FM at LFM's size: the same config with one block (the free block alone), its
    network ``depth`` hidden layers deep (default LFM's) and ``width`` wide (default: LFM's total
    parameters), trained until the budget runs out."""
    cfg = copy.deepcopy(lfm)
    net = {**lfm["net"], "depth": depth or lfm["net"]["depth"]}
    cfg["net"] = {**net, "width": width or fm_width(dim, lfm, depth)}
    cfg["blocks"] = {"schedule": "list", "h": [], "free_block": True}
    cfg.setdefault("train", {})["steps"] = BIG
    cfg["train"].pop("push_points", None)  # one block: no pushforward
    return cfg


def mlp_params(dim: int, net: dict) -> int:
    return count_parameters(build_net(dim, NetConfig(**net)))


def matched_width(dim: int, net: dict, target: int, copies: int = 1) -> int:
    """The width at which ``copies`` networks ``net`` have the parameter count closest to ``target``."""
    total = lambda w: copies * mlp_params(dim, {**net, "width": w})  # noqa: E731
    lo, hi = 1, 2  # the count grows with the width: double, then bisect to total(lo) < target <= total(hi)
    while total(hi) < target:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(mid) < target else (lo, mid)
    return min((lo, hi), key=lambda w: abs(total(w) - target))


def available(name: str) -> str | None:
    """``None`` when contender ``name`` can run, else what to install."""
    pkg = PACKAGES.get(name)
    if pkg is None:
        return None
    return None if importlib.util.find_spec(pkg) is not None else INSTALL[pkg]


def check_peers(a, suite: str) -> dict[str, str]:
    """Drop the contenders of ``a.contenders`` whose package is missing and return them with what to
    install: an error for a real run, skipped with the reason under ``--tiny``."""
    missing = {n: why for n in a.contenders if (why := available(n))}
    if missing and not a.tiny:
        sys.exit("missing benchmark peers:\n" + "\n".join(f"  {n}: {why}" for n, why in missing.items()))
    for n, why in missing.items():
        print(f"[{suite}] skipping {n}: not installed ({why})", flush=True)
    a.contenders = [n for n in a.contenders if n not in missing]
    return missing


def _conditional_flow_matcher():
    """torchcfm's ``ConditionalFlowMatcher``, importable without POT (see the module docstring)."""
    if available("torchcfm"):
        raise MissingPackage(f"torchcfm is not installed: {INSTALL['torchcfm']}")
    placeholder = None
    try:
        import ot  # noqa: F401
    except ImportError:
        placeholder = types.ModuleType("ot")

        def _absent(name: str):
            raise ImportError("POT is not installed; only torchcfm's optimal-transport matchers need it")

        placeholder.__getattr__ = _absent  # type: ignore[method-assign]
        sys.modules["ot"] = placeholder
    try:
        from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
    finally:
        if placeholder is not None and sys.modules.get("ot") is placeholder:
            del sys.modules["ot"]
    return ConditionalFlowMatcher


# ---------------------------------------------------------------------------------------------
# a clock that stops while learning curves are evaluated


class PausableClock:
    """``time.monotonic``/``perf_counter`` minus the time spent inside :meth:`pause`."""

    def __init__(self) -> None:
        self.paused = 0.0

    def monotonic(self) -> float:
        return time.monotonic() - self.paused

    def perf_counter(self) -> float:
        return time.perf_counter() - self.paused

    def __getattr__(self, name: str) -> Any:  # anything else localfm.training asks of ``time``
        return getattr(time, name)

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.paused += time.monotonic() - t0


CLOCK = PausableClock()


@contextlib.contextmanager
def _fit_uses_clock() -> Iterator[None]:
    saved = localfm.training.time
    localfm.training.time = CLOCK  # fit's budget, deadlines and rates read this clock
    try:
        yield
    finally:
        localfm.training.time = saved


@dataclass
class Curve:
    """Test NLL on fixed points at wall-clock checkpoints (training time, evaluation excluded)."""

    x: Tensor
    every_s: float
    points: list[dict] = field(default_factory=list)
    next_s: float = math.nan

    def __post_init__(self) -> None:
        if math.isnan(self.next_s):
            self.next_s = self.every_s  # the untrained model at t = 0 tells nothing and costs as much

    def due(self, elapsed: float) -> bool:
        return elapsed >= self.next_s

    def record(self, elapsed: float, log_prob: Callable[[Tensor], Tensor], *, final: bool = False, **extra) -> None:
        """Evaluate now (clock stopped); ``final``: the trained model, replacing a point just taken."""
        if final and self.points and elapsed - self.points[-1]["train_s"] < 0.02 * self.every_s:
            self.points.pop()
        with CLOCK.pause():
            t0 = time.perf_counter()
            lp = log_prob(self.x).double()
            s = metrics.nll_summary(lp)
            self.points.append(
                {
                    "train_s": elapsed,
                    "nll": s["nll"],
                    "nll_se": s["nll_se"],
                    "eval_s": time.perf_counter() - t0,
                    **extra,
                }
            )
        while self.next_s <= elapsed:
            self.next_s += self.every_s


# ---------------------------------------------------------------------------------------------
# trained models


@dataclass
class Trained:
    """A trained contender: its model, cost and record."""

    name: str
    n_params: int
    train_s: float  # wall-clock of training, pushforward included, evaluation pauses excluded
    push_s: float
    steps: str
    log_prob: Callable[[Tensor], Tensor]  # data units -> nats per point
    sample: Callable[[int, int], tuple[Tensor, int]]  # (n, seed) -> (points, network evaluations per sample)
    info: dict = field(default_factory=dict)
    flow: LocalFlow | None = None  # ODE contenders: the LocalFlow behind log_prob and sample


class _Reversed(nn.Module):
    """torchcfm's field (t = 0 noise, t = 1 data) in localfm's direction (t = 0 data, t = 1 noise)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return -self.net(x, 1 - t)


def _flow_fns(flow: LocalFlow) -> tuple[Callable, Callable]:
    def log_prob(x: Tensor) -> Tensor:
        return flow.log_prob(x, batch_size=8192)

    def sample(n: int, seed: int) -> tuple[Tensor, int]:
        z = torch.randn(n, *flow.event_shape, generator=torch.Generator().manual_seed(seed))
        xs, nfe = [], 0
        for i in range(0, n, 16384):
            out = flow.decode(z[i : i + 16384])
            xs.append(out.x)
            nfe = max(nfe, sum(out.nfe))
        return torch.cat(xs), nfe

    return log_prob, sample


def _partial_lfm(curve: Curve) -> Callable:
    """A ``fit`` callback that evaluates the chain as it stands (blocks done + the one in training).

    ``fit`` reports progress but not its networks, so the callback reads them from ``fit``'s frame
    (benchmark code only): ``flow`` holds the finished blocks, ``state.net`` the one in training.
    """

    def callback(p: localfm.Progress) -> None:
        if p.phase != "train" or not curve.due(p.elapsed):
            return
        frame = sys._getframe(1)
        while frame is not None and frame.f_code is not localfm.training.fit.__code__:
            frame = frame.f_back
        if frame is None:
            return
        f = frame.f_locals
        if not {"flow", "state", "hs", "n"} <= f.keys() or f["state"] is None:
            return  # fit's internals changed: no curve point rather than a wrong one
        flow, state, hs, n = f["flow"], f["state"], f["hs"], f["n"]
        net = copy.deepcopy(state.net).eval()
        partial = LocalFlow(flow.event_shape, [*flow.blocks, Block(net, hs[n])], flow.standardizer, flow.solver)
        curve.record(p.elapsed, lambda x: partial.log_prob(x, batch_size=8192), block=n + 1, blocks=len(hs))

    return callback


def _fit_contender(name: str, cfg: dict, x: Tensor, budget: float, seed: int, curve: Curve | None) -> Trained:
    with _fit_uses_clock():
        t0 = CLOCK.monotonic()
        flow = localfm.fit(x, cfg, time_budget=budget, seed=seed, callback=_partial_lfm(curve) if curve else None)
        train_s = CLOCK.monotonic() - t0
    log_prob, sample = _flow_fns(flow)
    tl = flow.training_log
    if curve is not None:
        curve.record(train_s, log_prob, final=True, block=len(flow), blocks=len(flow))
    return Trained(
        name,
        count_parameters(flow),
        train_s,
        sum(b["push_seconds"] for b in tl),
        ",".join(str(b["steps"]) for b in tl),
        log_prob,
        sample,
        {
            "config": cfg,
            "solver": cfg.get("solver"),
            "blocks": len(flow),
            "train_points": x.shape[0],
            "per_block_train_s": [round(b["train_seconds"], 2) for b in tl],
        },
        flow,
    )


def _adam(params, lr: float) -> torch.optim.Optimizer:
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr)


def _budget_loop(
    params: list[Tensor],
    loss_fn: Callable[[], Tensor],
    setting: Setting,
    budget: float,
    warmup: int,
    checkpoint: Callable[[float], None] | None,
) -> tuple[int, float]:
    """Adam steps of ``loss_fn`` until ``budget`` seconds of :data:`CLOCK` have passed; (steps, seconds).

    Warm-up, then cosine decay on the share of the budget used: ``fit``'s schedule under a budget.
    """
    opt = _adam(params, setting.lr)
    start = CLOCK.monotonic()
    step = 0
    while (elapsed := CLOCK.monotonic() - start) < budget:
        progress = elapsed / budget
        factor = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = setting.lr * factor
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 25 == 0:
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"loss is {float(loss.detach())} at step {step}")
            if checkpoint is not None:
                checkpoint(CLOCK.monotonic() - start)
    return step, CLOCK.monotonic() - start


def _train_torchcfm(suite: Suite, x: Tensor, setting: Setting, budget: float, seed: int, curve) -> Trained:
    cfm = _conditional_flow_matcher()(sigma=suite.torchcfm_sigma)
    std = Standardizer.fit(x)
    u = std(x.double()).float()
    dim = x.shape[1]
    torch.manual_seed(seed)  # torchcfm draws t (and the path noise) from the global generator
    net = build_net(dim, NetConfig(**suite.fm_net(dim)))
    solver = SolverConfig(**suite.ode_solver)
    gen = torch.Generator().manual_seed(seed)

    def as_flow(module: nn.Module) -> LocalFlow:
        return LocalFlow((dim,), [Block(_Reversed(module), None)], std, solver).eval()

    def loss_fn() -> Tensor:
        x1 = u[torch.randint(u.shape[0], (setting.batch_size,), generator=gen)]
        x0 = torch.randn(x1.shape, generator=gen)
        t, xt, ut = cfm.sample_location_and_conditional_flow(x0, x1)
        return (net(xt, t) - ut).pow(2).mean()

    def checkpoint(elapsed: float) -> None:
        if curve is not None and curve.due(elapsed):
            curve.record(elapsed, as_flow(copy.deepcopy(net)).log_prob)

    steps, seconds = _budget_loop(list(net.parameters()), loss_fn, setting, budget, suite.warmup, checkpoint)
    flow = as_flow(net)
    log_prob, sample = _flow_fns(flow)
    if curve is not None:
        curve.record(seconds, log_prob, final=True)
    info = {"sigma": suite.torchcfm_sigma, "net": suite.fm_net(dim), "solver": suite.ode_solver}
    return Trained("torchcfm", count_parameters(net), seconds, 0.0, str(steps), log_prob, sample, info, flow)


class _ZukoModel:
    """A zuko flow on standardised data; log-densities in data units."""

    def __init__(self, flow: nn.Module, std: Standardizer) -> None:
        self.flow, self.std = flow, std
        self.calls = 0
        for m in flow.modules():
            if hasattr(m, "hyper") and isinstance(m.hyper, nn.Module):
                m.hyper.register_forward_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.calls += 1

    @torch.no_grad()
    def log_prob(self, x: Tensor) -> Tensor:
        out = []
        for i in range(0, x.shape[0], 8192):
            u = self.std(torch.as_tensor(x[i : i + 8192]).double()).float()
            out.append(self.flow().log_prob(u).double() + self.std.logdet())
        return torch.cat(out)

    @torch.no_grad()
    def sample(self, n: int, seed: int) -> tuple[Tensor, int]:
        torch.manual_seed(seed)  # zuko samples from the global generator
        self.calls = 0
        u = self.flow().sample((n,))
        return self.std.inverse(u.double()).float(), self.calls


def _train_zuko(name: str, suite: Suite, x: Tensor, setting: Setting, budget: float, seed: int, curve) -> Trained:
    if available(name):
        raise MissingPackage(f"zuko is not installed: {INSTALL['zuko']}")
    import zuko

    kwargs = suite.nsf if name == "zuko-NSF" else suite.maf
    std = Standardizer.fit(x)
    u = std(x.double()).float()
    torch.manual_seed(seed)
    flow = (zuko.flows.NSF if name == "zuko-NSF" else zuko.flows.MAF)(x.shape[1], **kwargs)
    model = _ZukoModel(flow, std)
    gen = torch.Generator().manual_seed(seed)

    def loss_fn() -> Tensor:
        return -flow().log_prob(u[torch.randint(u.shape[0], (setting.batch_size,), generator=gen)]).mean()

    def checkpoint(elapsed: float) -> None:
        if curve is not None and curve.due(elapsed):
            curve.record(elapsed, model.log_prob)

    steps, seconds = _budget_loop(list(flow.parameters()), loss_fn, setting, budget, suite.warmup, checkpoint)
    flow.eval()
    if curve is not None:
        curve.record(seconds, model.log_prob, final=True)
    info = {"zuko": kwargs}
    return Trained(name, count_parameters(flow), seconds, 0.0, str(steps), model.log_prob, model.sample, info)


def train(
    name: str,
    suite: Suite,
    x_train: Tensor,
    setting: Setting,
    budget: float,
    *,
    seed: int = 0,
    curve: Curve | None = None,
) -> Trained:
    """Train contender ``name`` on ``x_train`` (N, d) in data units for ``budget`` wall-clock seconds."""
    x = torch.as_tensor(x_train).float()
    if name == "LFM":
        pool = x[: suite.lfm_pool] if suite.lfm_pool else x
        return _fit_contender(name, suite.lfm_config(setting, x.shape[1]), pool, budget, seed, curve)
    if name == "FM":
        return _fit_contender(name, suite.fm_config(setting, x.shape[1]), x, budget, seed, curve)
    if name == "torchcfm":
        return _train_torchcfm(suite, x, setting, budget, seed, curve)
    if name in ("zuko-NSF", "zuko-MAF"):
        return _train_zuko(name, suite, x, setting, budget, seed, curve)
    raise ValueError(f"unknown contender {name!r}; known: {', '.join(CONTENDERS)}")


def solver_check(trained: Trained, x: Tensor) -> dict:
    """An ODE model's NLL on ``x`` with its own solver and with dopri5 (1e-5): the solver's share of the NLL.

    Empty for models without an ODE (zuko). The library's :func:`localfm.runs.solver_check`, with
    dopri5 as the finer solver, under this suite's column names.
    """
    if trained.flow is None:
        return {}
    c = runs.solver_check(trained.flow, x, batch_size=8192, finer=SolverConfig("dopri5", rtol=1e-5, atol=1e-5))
    return {
        "own_solver_nll": c["nll"],
        "dopri5_nll": c["nll_finer"],
        "solver_diff": -c["difference"],  # own NLL - dopri5 NLL, on the same points
        "solver_diff_se": c["difference_se"],
        "dopri5_s": c["finer_seconds"],
    }


def nll_log_prob(trained: Trained, solver: SolverConfig | None = None) -> Callable[[Tensor], Tensor]:
    """The model's log-density, with ``solver`` for an ODE model when given (zuko: exact anyway)."""
    if solver is None or trained.flow is None:
        return trained.log_prob
    return lambda x: trained.flow.log_prob(x, solver=solver, batch_size=8192)


def paired_gap(true_log_prob: Callable[[Tensor], Tensor], x: Tensor, lp: Tensor) -> tuple[float, float]:
    """Mean ± SE over the points ``x`` of ``log p(x) - log p_model(x)`` (``lp``): the mean estimates
    KL(p || model), with a much smaller error than the NLL's, as both terms share the points."""
    d = torch.as_tensor(true_log_prob(x)).double() - lp
    return float(d.mean()), float(d.std() / math.sqrt(d.numel()))


def evaluate(
    trained: Trained,
    x_test: Tensor,
    *,
    n_samples: int = 10_000,
    seed: int = 1,
    true_log_prob: Callable[[Tensor], Tensor] | None = None,
    nll: bool = True,
    solver: SolverConfig | None = None,
) -> dict:
    """Test NLL ± SE, energy distance of ``n_samples`` samples to as many test points, times, NFE.

    ``solver``: the likelihood of an ODE model comes from this solver instead of the model's own
    (one reference solver for every contender); samples always use the model's own.
    """
    x_test = torch.as_tensor(x_test).float()
    row: dict = {}
    if nll:
        t0 = time.perf_counter()
        lp = nll_log_prob(trained, solver)(x_test).double()
        row = {**metrics.nll_summary(lp), "nll_eval_s": time.perf_counter() - t0}
    if nll and true_log_prob is not None:
        row["paired_gap"], row["paired_gap_se"] = paired_gap(true_log_prob, x_test, lp)
    t0 = time.perf_counter()
    xs, nfe = trained.sample(n_samples, seed)
    row["sample_s"] = time.perf_counter() - t0
    row["nfe_per_sample"] = nfe
    ref = x_test[:n_samples]
    finite = torch.isfinite(xs).all(1)
    row["nonfinite_samples"] = int((~finite).sum())
    row["energy_distance"] = metrics.energy_distance(xs[finite], ref) if finite.sum() > 1 else math.nan
    return row


# ---------------------------------------------------------------------------------------------
# results kept row by row, so that an interrupted suite resumes where it stopped


def load_rows(name: str) -> dict[str, list[dict]]:
    """The rows already measured (``raw.rows`` of ``results/<name>.json``), by kind."""
    import json

    import _common

    path = _common.RESULTS / f"{name}.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text()).get("raw", {}).get("rows", {})


def find(rows: list[dict], **key: Any) -> dict | None:
    for r in rows:
        if all(r.get(k) == v for k, v in key.items()):
            return r
    return None
