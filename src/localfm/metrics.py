"""Sample-quality metrics between two point sets: energy distance and kernel MMD.

Both are computed exactly on the given points (no subsampling) in blocks, so memory stays
bounded, and both are zero in expectation only when the two laws agree.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["energy_distance", "mmd", "nll_summary"]


def _mean_pairwise(a: Tensor, b: Tensor, fn, block: int = 4096, exclude_diagonal: bool = False) -> float:
    total, count = 0.0, 0
    for i in range(0, a.shape[0], block):
        ai = a[i : i + block]
        for j in range(0, b.shape[0], block):
            v = fn(torch.cdist(ai, b[j : j + block]))
            if exclude_diagonal and i == j:
                v = v - torch.diag_embed(torch.diagonal(v))
            total += float(v.sum())
            count += v.numel()
    if exclude_diagonal:
        count -= a.shape[0]
    return total / count


def _flat(x, name: str) -> Tensor:
    x = torch.as_tensor(x).double()
    if x.dim() < 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must hold at least 2 points of shape (N, ...), got {tuple(x.shape)}")
    return x.flatten(1)


def energy_distance(x, y) -> float:
    """``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (the unbiased U-statistic; >= 0 in expectation).

    Args:
        x: samples, shape (N, ...); y: reference points, shape (M, ...).
    """
    x, y = _flat(x, "x"), _flat(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    xy = _mean_pairwise(x, y, lambda d: d)
    xx = _mean_pairwise(x, x, lambda d: d, exclude_diagonal=True)
    yy = _mean_pairwise(y, y, lambda d: d, exclude_diagonal=True)
    return 2 * xy - xx - yy


def mmd(x, y, *, bandwidth: float | None = None) -> float:
    """Unbiased squared MMD with the Gaussian kernel ``exp(-|a - b|^2 / (2 bandwidth^2))``.

    ``bandwidth`` defaults to the median distance between points of ``y`` (on up to 2000 points).
    """
    x, y = _flat(x, "x"), _flat(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    if bandwidth is None:
        sub = y[:2000]
        d = torch.cdist(sub, sub)
        bandwidth = float(d[torch.triu(torch.ones_like(d, dtype=torch.bool), 1)].median())
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")

    def k(d: Tensor) -> Tensor:
        return torch.exp(-(d**2) / (2 * bandwidth**2))

    return (
        _mean_pairwise(x, x, k, exclude_diagonal=True)
        + _mean_pairwise(y, y, k, exclude_diagonal=True)
        - 2 * _mean_pairwise(x, y, k)
    )


def nll_summary(log_prob: Tensor) -> dict[str, float]:
    """Mean negative log-likelihood in nats with its standard error, from per-point ``log p``."""
    lp = torch.as_tensor(log_prob).double()
    return {"nll": float(-lp.mean()), "nll_se": float(lp.std() / math.sqrt(lp.numel())), "n": int(lp.numel())}
