"""The chain of blocks: ``LocalFlow`` maps data to N(0, I) (``encode``) and back (``decode``).

Direction convention, used everywhere in localfm: **forward = data to noise** (each block's ODE
runs t: 0 -> 1), **inverse = noise to data** (t: 1 -> 0). Block ``n`` of ``flow.blocks`` is the
n-th block trained, nearest the data; the last block is nearest the Gaussian base.

``log p(x) = log q(z) + sum_n integral_0^1 div v_n(x^(n)(t), t) dt - sum_i log scale_i``,
with ``z`` the code of ``x`` and ``scale`` the per-coordinate standardisation.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .ode import Solution, SolverConfig, integrate

__all__ = ["Standardizer", "Block", "LocalFlow", "FlowOutput", "check_data", "check_context"]


def check_data(x: Tensor, name: str, event_shape: tuple[int, ...] | None = None) -> Tensor:
    """Validate a batch of points at the library boundary (ValueError naming ``name``)."""
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be an array or tensor of numbers, got {type(x).__name__}: {err}") from None
    if not (x.is_floating_point() or x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape (N, d) or (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x[0].numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if event_shape is not None and tuple(x.shape[1:]) != tuple(event_shape):
        raise ValueError(f"{name} has points of shape {tuple(x.shape[1:])}, the model expects {tuple(event_shape)}")
    if x.is_floating_point():
        for start, part in row_chunks(x):  # a memory-mapped data set is checked piece by piece
            bad = ~torch.isfinite(part)
            if bad.any():
                idx = (start + int(bad.nonzero()[0][0]), *(int(i) for i in bad.nonzero()[0][1:]))
                raise ValueError(f"{name} has a non-finite value {x[idx].item()} at index {idx}")
    return x


_ONE_PIECE = 1 << 26  # bytes of float64 copy up to which Standardizer.fit works on the data in one piece


def row_chunks(x: Tensor, nbytes: int = 1 << 26):
    """``(start, x[start:start + k])`` over the rows of ``x``, about ``nbytes`` at a time."""
    k = max(1, nbytes // max(1, x[0].numel() * x.element_size()))
    for start in range(0, x.shape[0], k):
        yield start, x[start : start + k]


def check_context(context, rows: int, context_dim: int, name: str = "context") -> Tensor | None:
    """Validate a context for ``rows`` points of a model whose networks take ``context_dim`` inputs.

    A conditional model (``context_dim > 0``) needs a context of shape (rows, context_dim) (one row
    (1, c) or (c,) is broadcast to every point); an unconditional one must get none.
    """
    if context is None:
        if context_dim:
            raise ValueError(
                f"this model is conditional (net.context_dim = {context_dim}): pass {name}= of shape (N, {context_dim})"
            )
        return None
    if not context_dim:
        raise ValueError(
            f"{name}= was given but this model is unconditional (net.context_dim = 0); "
            "set net.context_dim to condition it"
        )
    if not torch.is_tensor(context):
        context = torch.as_tensor(context)
    c = check_data(context.reshape(1, -1) if context.dim() == 1 else context, name)
    if c.dim() != 2 or c.shape[1] != context_dim:
        raise ValueError(f"{name} must have shape (N, {context_dim}) (net.context_dim), got {tuple(c.shape)}")
    if c.shape[0] == 1 and rows != 1:
        c = c.expand(rows, -1)
    if c.shape[0] != rows:
        raise ValueError(f"{name} has {c.shape[0]} rows but there are {rows} points: give one context row per point")
    return c


class Standardizer(nn.Module):
    """Affine map ``u = (x - mean) / scale`` per coordinate; ``logdet = -sum log scale``."""

    def __init__(self, mean: Tensor, scale: Tensor) -> None:
        super().__init__()
        if (scale <= 0).any():
            raise ValueError("standardisation scale must be > 0 in every coordinate")
        self.register_buffer("mean", mean.clone())
        self.register_buffer("scale", scale.clone())

    @classmethod
    def fit(cls, x: Tensor, *, per_coordinate: bool = True) -> Standardizer:
        """Mean and standard deviation of ``x`` (N, ...); constant coordinates keep scale 1.

        Images (``per_coordinate=False``) use one mean and scale for all pixels.
        """
        if x.shape[0] * x[0].numel() * 8 <= _ONE_PIECE:
            x = x.double()
            if per_coordinate:
                mean, scale = x.mean(0), x.std(0)
            else:
                mean = x.mean().expand(x.shape[1:]).clone()
                scale = x.std().expand(x.shape[1:]).clone()
        else:  # in pieces (two passes), so a large or memory-mapped data set is never copied whole
            dims = (0,) if per_coordinate else tuple(range(x.dim()))
            count = x.shape[0] * (1 if per_coordinate else x[0].numel())
            mean = sum(part.double().sum(dims) for _, part in row_chunks(x, 1 << 23)) / count
            sq = sum((part.double() - mean).pow(2).sum(dims) for _, part in row_chunks(x, 1 << 23))
            scale = (sq / max(count - 1, 1)).sqrt()
            mean, scale = mean.expand(x.shape[1:]).clone(), scale.expand(x.shape[1:]).clone()
        scale = torch.where(scale > 1e-12, scale, torch.ones_like(scale))
        return cls(mean, scale)

    @classmethod
    def identity(cls, event_shape: tuple[int, ...]) -> Standardizer:
        return cls(torch.zeros(event_shape, dtype=torch.float64), torch.ones(event_shape, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) / self.scale.to(x.dtype)

    def inverse(self, u: Tensor) -> Tensor:
        return u * self.scale.to(u.dtype) + self.mean.to(u.dtype)

    def logdet(self) -> float:
        """``log |du/dx|`` of the forward map, the same for every point."""
        return -float(self.scale.log().sum())


class Block(nn.Module):
    """One sub-flow: ``T_n(x)`` solves ``dx/dt = v_n(x, t)`` on t in [0, 1].

    ``h`` is the block's OU step (``None`` for the free block); it is kept for the record, the map
    itself depends on the network only.
    """

    def __init__(self, net: nn.Module, h: float | None) -> None:
        super().__init__()
        self.net = net
        self.h = h

    def velocity(self, context: Tensor | None = None, guidance: float = 0.0):
        """``v(x, t)``, or ``v(x, t, c)``; with ``guidance = w`` the classifier-free guided field
        ``(1 + w) v(x, t, c) - w v(x, t, null)``, both terms in one network call."""
        if context is None:
            return lambda x, t: self.net(x, t)
        if not guidance:
            return lambda x, t: self.net(x, t, context)
        null = getattr(self.net, "null_context", None)
        if not isinstance(null, Tensor):
            raise ValueError(
                "guidance needs a network with a learned null_context (train with train.context_dropout > 0)"
            )
        both = torch.cat([context, null.to(context.dtype).expand_as(context)])

        def guided(x: Tensor, t: Tensor) -> Tensor:
            t2 = t if t.dim() == 0 else torch.cat([t, t])
            v_c, v_null = self.net(torch.cat([x, x]), t2, both).chunk(2)
            return (1 + guidance) * v_c - guidance * v_null

        return guided

    def forward(
        self,
        x: Tensor,
        *,
        solver: SolverConfig,
        divergence: str | None = None,
        probe: Tensor | None = None,
        context: Tensor | None = None,
        guidance: float = 0.0,
    ) -> Solution:
        """Data side to noise side (t: 0 -> 1); ``delta`` is ``+integral div v dt``."""
        return integrate(
            self.velocity(context, guidance), x, t0=0.0, t1=1.0, solver=solver, divergence=divergence, probe=probe
        )

    def inverse(
        self,
        z: Tensor,
        *,
        solver: SolverConfig,
        divergence: str | None = None,
        probe: Tensor | None = None,
        context: Tensor | None = None,
        guidance: float = 0.0,
    ) -> Solution:
        """Noise side to data side (t: 1 -> 0); ``delta`` is ``-integral div v dt``."""
        return integrate(
            self.velocity(context, guidance), z, t0=1.0, t1=0.0, solver=solver, divergence=divergence, probe=probe
        )

    def extra_repr(self) -> str:
        return "free block" if self.h is None else f"h={self.h:.4g}"


@dataclass
class FlowOutput:
    """What a pass through the chain returns.

    ``x``: the end points (codes for ``encode``, data for ``decode``/``sample``). ``log_prob``:
    log-density of the data points in nats, or ``None``. ``nfe``: network evaluations per block.
    ``path``: with ``return_path``, the points before the first block and after each block, in the
    standardised coordinates where the blocks act (``x`` itself is in data units for ``decode``).
    """

    x: Tensor
    log_prob: Tensor | None
    nfe: list[int]
    path: list[Tensor] | None = None


class LocalFlow(nn.Module):
    """A chain of blocks over a standard Gaussian base, with the data standardisation built in.

    Args:
        event_shape: shape of one data point, e.g. ``(6,)`` or ``(1, 28, 28)``.
        blocks: trained blocks, nearest the data first.
        standardizer: the affine map applied before the first block.
        solver: default solver settings for ``encode``, ``decode``, ``log_prob``, ``sample``.
        config: the resolved :class:`~localfm.config.FlowConfig` this flow was trained with.
    """

    def __init__(
        self,
        event_shape,
        blocks=(),
        standardizer: Standardizer | None = None,
        solver: SolverConfig = SolverConfig(),
        config=None,
    ) -> None:
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)
        self.blocks = nn.ModuleList(blocks)
        self.standardizer = standardizer if standardizer is not None else Standardizer.identity(self.event_shape)
        self.solver = solver
        self.config = config
        self.training_log: list[dict] = []

    # --- container protocol --------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self) -> Iterator[Block]:
        return iter(self.blocks)

    def __getitem__(self, index: int | slice):
        """``flow[n]`` is block n; ``flow[a:b]`` is a chain of those blocks (same base).

        A slice starting after block 0 has no standardisation: it acts on standardised points.
        """
        if isinstance(index, slice):
            start, stop, stride = index.indices(len(self))
            std = self.standardizer if start == 0 else None
            solver = self.solver
            if isinstance(solver.grid_power, tuple):  # each block keeps its own grid
                powers = tuple(solver.for_block(i).grid_power for i in range(start, stop, stride))
                solver = replace(solver, grid_power=powers or solver.grid_power)
            return LocalFlow(self.event_shape, list(self.blocks)[index], std, solver, self.config)
        return self.blocks[index]

    def append(self, block: Block) -> None:
        self.blocks.append(block)

    @property
    def dim(self) -> int:
        return math.prod(self.event_shape)

    @property
    def context_dim(self) -> int:
        """Size c of the context the block networks take (0: unconditional)."""
        if len(self.blocks):
            return int(getattr(self.blocks[0].net, "context_dim", 0))
        net = getattr(self.config, "net", None)
        return int(getattr(net, "context_dim", 0))

    @property
    def device(self) -> torch.device:
        return self.standardizer.mean.device

    def extra_repr(self) -> str:
        n_params = sum(p.numel() for p in self.parameters())
        return f"event_shape={self.event_shape}, blocks={len(self)}, parameters={n_params:,}, solver={self.solver}"

    # --- passes ----------------------------------------------------------------------------
    def _divergence(self, divergence: str) -> str:
        if divergence == "auto":
            return "exact" if len(self.event_shape) == 1 and self.dim <= 128 else "hutchinson"
        if divergence not in ("exact", "hutchinson"):
            raise ValueError(f"divergence must be 'auto', 'exact' or 'hutchinson', got {divergence!r}")
        return divergence

    def _base_log_prob(self, z: Tensor) -> Tensor:
        return -0.5 * z.flatten(1).pow(2).sum(1) - 0.5 * self.dim * math.log(2 * math.pi)

    def _run(
        self,
        x: Tensor,
        *,
        inverse: bool,
        with_log_prob: bool,
        solver,
        divergence,
        generator,
        context,
        return_path,
        guidance: float = 0.0,
    ) -> FlowOutput:
        solver = solver or self.solver
        context = check_context(context, x.shape[0], self.context_dim)
        if context is not None:
            context = context.to(x.device, x.dtype)
        if guidance and context is None:
            raise ValueError("guidance= needs a conditional model and its context=")
        div = self._divergence(divergence) if with_log_prob else None
        probe = None
        if div == "hutchinson":
            # Rademacher probes drawn once per pass and kept through every block's solve.
            probe = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
        delta = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        nfe, path = [], [x] if return_path else None
        order = list(enumerate(self.blocks))
        for index, block in reversed(order) if inverse else order:
            step = block.inverse if inverse else block.forward
            sol = step(
                x, solver=solver.for_block(index), divergence=div, probe=probe, context=context, guidance=guidance
            )
            x = sol.x
            if sol.delta is not None:
                delta = delta + sol.delta
            nfe.append(sol.nfe)
            if return_path:
                path.append(x)
        if inverse:
            nfe.reverse()
        return FlowOutput(x, delta if with_log_prob else None, nfe, path)

    @torch.no_grad()
    def encode(
        self,
        x: Tensor,
        *,
        solver: SolverConfig | None = None,
        with_log_prob: bool = False,
        divergence: str = "auto",
        generator: torch.Generator | None = None,
        context: Tensor | None = None,
        return_path: bool = False,
        guidance: float = 0.0,
    ) -> FlowOutput:
        """Data (in data units) to codes z, through every block forward.

        With ``with_log_prob`` the output's ``log_prob`` is ``log p(x)`` in nats (``log p(x | c)``
        for a conditional model given ``context`` (N, c)).
        """
        x = check_data(x, "x", self.event_shape).to(self.device, self._dtype())
        u = self.standardizer(x)
        out = self._run(
            u,
            inverse=False,
            with_log_prob=with_log_prob,
            solver=solver,
            divergence=divergence,
            generator=generator,
            context=context,
            return_path=return_path,
            guidance=guidance,
        )
        if with_log_prob:
            out.log_prob = self._base_log_prob(out.x) + out.log_prob + self.standardizer.logdet()
        return out

    @torch.no_grad()
    def decode(
        self,
        z: Tensor,
        *,
        solver: SolverConfig | None = None,
        with_log_prob: bool = False,
        divergence: str = "auto",
        generator: torch.Generator | None = None,
        context: Tensor | None = None,
        return_path: bool = False,
        guidance: float = 0.0,
    ) -> FlowOutput:
        """Codes z to data (in data units), through every block inverse, last block first.

        ``context`` (N, c) conditions a conditional model; ``guidance = w`` follows the
        classifier-free guided field ``(1 + w) v(x, t, c) - w v(x, t, null)`` (0: unguided).
        """
        z = check_data(z, "z", self.event_shape).to(self.device, self._dtype())
        out = self._run(
            z,
            inverse=True,
            with_log_prob=with_log_prob,
            solver=solver,
            divergence=divergence,
            generator=generator,
            context=context,
            return_path=return_path,
            guidance=guidance,
        )
        if with_log_prob:
            # delta accumulated -integral div v over the blocks.
            out.log_prob = self._base_log_prob(z) - out.log_prob + self.standardizer.logdet()
        out.x = self.standardizer.inverse(out.x)
        return out

    def _dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return self.standardizer.mean.dtype  # no blocks: compute in the standardisation's precision

    def log_prob(
        self,
        x: Tensor,
        *,
        solver: SolverConfig | None = None,
        divergence: str = "auto",
        batch_size: int = 4096,
        generator: torch.Generator | None = None,
        context: Tensor | None = None,
        progress=None,
    ) -> Tensor:
        """``log p(x)`` in nats for each point of ``x`` (N, ...), in the units of ``x``.

        Exact divergence for small flat d, Hutchinson otherwise (``divergence=`` overrides).
        Points are processed in batches of ``batch_size``; ``progress(done, total)`` is called after each.
        """
        x = check_data(x, "x", self.event_shape)
        context = check_context(context, x.shape[0], self.context_dim)
        out = []
        for i in range(0, x.shape[0], batch_size):
            ctx = None if context is None else context[i : i + batch_size]
            res = self.encode(
                x[i : i + batch_size],
                solver=solver,
                with_log_prob=True,
                divergence=divergence,
                generator=generator,
                context=ctx,
            )
            out.append(res.log_prob)
            if progress is not None:
                progress(min(i + batch_size, x.shape[0]), x.shape[0])
        return torch.cat(out)

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        solver: SolverConfig | None = None,
        context: Tensor | None = None,
        batch_size: int = 65536,
        guidance: float = 0.0,
    ) -> Tensor:
        """``n`` samples in data units: ``z ~ N(0, I)`` pulled back through the chain.

        A conditional model takes ``context`` of shape (n, c) (or one row for all samples) and
        an optional classifier-free ``guidance`` weight (see :meth:`decode`).
        """
        return self.sample_and_log_prob(
            n,
            generator=generator,
            solver=solver,
            context=context,
            batch_size=batch_size,
            with_log_prob=False,
            guidance=guidance,
        )[0]

    def sample_and_log_prob(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        solver: SolverConfig | None = None,
        context: Tensor | None = None,
        divergence: str = "auto",
        batch_size: int = 4096,
        with_log_prob: bool = True,
        guidance: float = 0.0,
    ) -> tuple[Tensor, Tensor | None]:
        """Samples and their log-density, in one inverse solve per block."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):  # numpy integers are fine
            raise TypeError(f"n must be a positive integer, got {type(n).__name__} {n!r}")
        n = int(n)
        if n < 1:
            raise ValueError(f"n must be a positive integer, got {n}")
        z = torch.randn(
            (n, *self.event_shape),
            generator=generator,
            dtype=self._dtype(),
            device=generator.device if generator is not None else self.device,
        )
        z = z.to(self.device)
        context = check_context(context, n, self.context_dim)
        xs, lps = [], []
        for i in range(0, n, batch_size):
            ctx = None if context is None else context[i : i + batch_size]
            out = self.decode(
                z[i : i + batch_size],
                solver=solver,
                with_log_prob=with_log_prob,
                divergence=divergence,
                generator=generator,
                context=ctx,
                guidance=guidance,
            )
            xs.append(out.x)
            lps.append(out.log_prob)
        return torch.cat(xs), (torch.cat(lps) if with_log_prob else None)
