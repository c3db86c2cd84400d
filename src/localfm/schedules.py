"""Ornstein-Uhlenbeck step sizes of the blocks, and the OU transition itself.

The forward process is ``dX = -X dt + sqrt(2) dW``; over a time step ``h`` it maps
``x -> e^{-h} x + sqrt(1 - e^{-2h}) z`` with ``z ~ N(0, I)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

__all__ = ["ou_step", "geometric_steps", "block_steps"]


def ou_step(x: Tensor, h: float, noise: Tensor) -> Tensor:
    """One exact OU transition over time ``h``: ``e^{-h} x + sqrt(1 - e^{-2h}) noise``.

    Args:
        x: points, shape (B, ...).
        h: step size, > 0.
        noise: standard normal draws of the same shape as ``x``.
    """
    if not h > 0:
        raise ValueError(f"OU step size h must be > 0, got {h}")
    return math.exp(-h) * x + math.sqrt(-math.expm1(-2 * h)) * noise


def geometric_steps(c: float, rho: float, L: int) -> list[float]:
    """``h_n = c * rho^(n-1)`` for ``n = 1..L``."""
    if L < 0:
        raise ValueError(f"number of OU blocks L must be >= 0, got {L}")
    if not (c > 0 and rho > 0):
        raise ValueError(f"geometric steps need c > 0 and rho > 0, got c={c}, rho={rho}")
    try:
        h = [c * rho**n for n in range(L)]
    except OverflowError:
        h = [math.inf]
    if not all(math.isfinite(h_n) and h_n > 0 for h_n in h):
        raise ValueError(f"geometric steps c * rho^(n-1) leave the finite positive numbers for c={c}, rho={rho}, L={L}")
    return h


def block_steps(h: Sequence[float], free_block: bool) -> list[float | None]:
    """The step of every block in training order; ``None`` marks the final free block."""
    for i, h_n in enumerate(h):
        if not (isinstance(h_n, (int, float)) and h_n > 0 and math.isfinite(h_n)):
            raise ValueError(f"step size h[{i}] must be a finite number > 0, got {h_n!r}")
    out: list[float | None] = [float(h_n) for h_n in h]
    if free_block:
        out.append(None)
    if not out:
        raise ValueError("a flow needs at least one block: give OU steps or enable the free block")
    return out
