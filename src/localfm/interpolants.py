"""Interpolants between the two ends of a block, and the law of the time variable.

An interpolant ``I_t(x_l, x_r)`` joins a point of the block's data side ``x_l`` (t = 0) to a
point of its noise side ``x_r`` (t = 1). Flow matching regresses the velocity network onto
``dI_t/dt`` at ``I_t``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Interpolant", "TrigInterpolant", "LinearInterpolant", "TimeSampler", "get_interpolant"]


class Interpolant(ABC):
    """Base class: ``x_t = I_t(x_l, x_r)`` and its time derivative ``dx_t = dI_t/dt``."""

    name: str = ""

    @abstractmethod
    def x_t(self, x_l: Tensor, x_r: Tensor, t: Tensor) -> Tensor: ...

    @abstractmethod
    def dx_t(self, x_l: Tensor, x_r: Tensor, t: Tensor) -> Tensor: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _expand(t: Tensor, x: Tensor) -> Tensor:
    """Broadcast per-sample times of shape (B,) against x of shape (B, ...)."""
    return t.reshape(t.shape + (1,) * (x.dim() - t.dim()))


class TrigInterpolant(Interpolant):
    """``I_t = cos(pi t / 2) x_l + sin(pi t / 2) x_r``.

    ``dI_t/dt = (pi / 2) (cos(pi t / 2) x_r - sin(pi t / 2) x_l)``. With independent Gaussian
    ``x_r`` it keeps the second moment of a standardised ``x_l`` constant along the path.
    """

    name = "trig"

    def x_t(self, x_l: Tensor, x_r: Tensor, t: Tensor) -> Tensor:
        a = _expand(t, x_l) * (math.pi / 2)
        return torch.cos(a) * x_l + torch.sin(a) * x_r

    def dx_t(self, x_l: Tensor, x_r: Tensor, t: Tensor) -> Tensor:
        a = _expand(t, x_l) * (math.pi / 2)
        return (math.pi / 2) * (torch.cos(a) * x_r - torch.sin(a) * x_l)


class LinearInterpolant(Interpolant):
    """``I_t = (1 - t) x_l + t x_r`` with ``dI_t/dt = x_r - x_l``."""

    name = "linear"

    def x_t(self, x_l: Tensor, x_r: Tensor, t: Tensor) -> Tensor:
        t = _expand(t, x_l)
        return (1 - t) * x_l + t * x_r

    def dx_t(self, x_l: Tensor, x_r: Tensor, t: Tensor) -> Tensor:
        return x_r - x_l


_INTERPOLANTS = {"trig": TrigInterpolant, "linear": LinearInterpolant}


def get_interpolant(name: str) -> Interpolant:
    """Return the interpolant called ``name`` (``"trig"`` or ``"linear"``)."""
    if name not in _INTERPOLANTS:
        raise ValueError(f"interpolant must be one of {sorted(_INTERPOLANTS)}, got {name!r}")
    return _INTERPOLANTS[name]()


@dataclass(frozen=True)
class TimeSampler:
    """Law of the training time ``t``: ``U[0, 1]`` (``dist="uniform"``) or ``Beta(a, b)``.

    ``Beta(1, 0.5)`` puts more mass near ``t = 1`` (the authors' GAS setting).
    """

    dist: str = "uniform"
    a: float = 1.0
    b: float = 1.0

    def __post_init__(self) -> None:
        if self.dist not in ("uniform", "beta"):
            raise ValueError(f"time distribution must be 'uniform' or 'beta', got {self.dist!r}")
        if self.dist == "beta" and not (self.a > 0 and self.b > 0):
            raise ValueError(f"Beta time law needs a > 0 and b > 0, got a={self.a}, b={self.b}")

    def sample(self, n: int, *, generator: torch.Generator, device=None, dtype=None) -> Tensor:
        """Draw ``n`` independent times, shape (n,)."""
        u = torch.rand(n, generator=generator, device=device, dtype=dtype)
        if self.dist == "uniform":
            return u
        # torch.distributions cannot take a generator, so Beta(a, b) = X / (X + Y) with
        # X ~ Gamma(a), Y ~ Gamma(b), both drawn from our seeded generator. In float64 and as
        # sigmoid(log X - log Y): Gamma draws with a shape << 1 underflow, and 0 / 0 is NaN.
        log_x = _log_gamma(self.a, n, generator, u.device, torch.float64)
        log_y = _log_gamma(self.b, n, generator, u.device, torch.float64)
        return torch.sigmoid(log_x - log_y).to(u.dtype)


def _log_gamma(shape: float, n: int, generator: torch.Generator, device, dtype) -> Tensor:
    """Logs of Gamma(shape, 1) draws from a seeded generator (Marsaglia-Tsang, boosted for shape < 1)."""
    boost = shape < 1
    k = shape + 1 if boost else shape
    d = k - 1 / 3
    c = 1 / math.sqrt(9 * d)
    out = torch.empty(n, device=device, dtype=dtype)
    filled = 0
    while filled < n:
        m = 2 * (n - filled) + 16
        z = torch.randn(m, generator=generator, device=device, dtype=dtype)
        u = torch.rand(m, generator=generator, device=device, dtype=dtype)
        v = (1 + c * z) ** 3
        ok = (v > 0) & (torch.log(u.clamp_min(1e-300)) < 0.5 * z**2 + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        acc = (d * v)[ok][: n - filled]
        out[filled : filled + acc.numel()] = acc
        filled += acc.numel()
    out = out.log()
    if boost:  # Gamma(shape) = Gamma(shape + 1) * U^(1 / shape)
        u = torch.rand(n, generator=generator, device=device, dtype=dtype)
        out = out + u.log() / shape
    return out
