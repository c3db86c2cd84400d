"""Figures of a run: samples against the target, the block-by-block picture, the learned
density, loss curves, marginals for d > 2, and image grids. Needs the ``plot`` extra (matplotlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = [
    "plot_samples_2d",
    "plot_block_paths",
    "plot_density_2d",
    "plot_losses",
    "plot_marginals",
    "box_2d",
    "image_grid",
    "plot_image_grids",
    "plot_image_blocks",
]


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'localfm[plot]'") from err
    return plt


def _save(fig, path: Path) -> Path:
    import io

    from .checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def box_2d(x: np.ndarray, margin: float = 0.05) -> tuple[float, float, float, float]:
    """A square plotting box around the bulk (0.1%..99.9% quantiles) of 2-D points."""
    lo, hi = np.quantile(x, 0.001, axis=0), np.quantile(x, 0.999, axis=0)
    c, r = (lo + hi) / 2, (hi - lo).max() / 2 * (1 + margin)
    return float(c[0] - r), float(c[0] + r), float(c[1] - r), float(c[1] + r)


def _counts(x: np.ndarray, box, bins: int) -> np.ndarray:
    return np.histogram2d(x[:, 0], x[:, 1], bins=bins, range=[box[:2], box[2:]])[0]


def _robust_max(values: np.ndarray, q: float = 99.5) -> float:
    """A colour-scale top that a few hot cells (a model's density spike) cannot wash out."""
    positive = values[values > 0]
    return float(np.percentile(positive, q)) if positive.size else 1.0


def _hist(ax, x: np.ndarray, box, bins: int = 200, title: str = "", vmax: float | None = None) -> None:
    """2-D histogram of points on a linear colour scale topped at ``vmax`` (default: robust max)."""
    counts = _counts(x, box, bins)
    top = vmax if vmax is not None else _robust_max(counts)
    ax.imshow(counts.T, origin="lower", extent=box, cmap="magma", vmin=0.0, vmax=top, interpolation="nearest")
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)


def plot_samples_2d(samples: np.ndarray, target: np.ndarray, path: Path, box=None) -> Path:
    """Histograms of model samples and of the target's points on one colour scale (per point)."""
    plt = _plt()
    box = box or box_2d(target)
    bins = 200
    # One scale for both panels, taken from the target and rescaled by the point counts.
    top = _robust_max(_counts(target, box, bins)) / len(target)
    fig, axes = plt.subplots(1, 2, figsize=(12, 6))
    _hist(axes[0], target, box, bins, title=f"target ({len(target):,} points)", vmax=top * len(target))
    _hist(axes[1], samples, box, bins, title=f"LFM samples ({len(samples):,})", vmax=top * len(samples))
    return _save(fig, path)


def plot_block_paths(encode_path: list[np.ndarray], decode_path: list[np.ndarray], path: Path, box=None) -> Path:
    """Top row: data pushed block by block to noise. Bottom row: noise pulled back to data."""
    plt = _plt()
    k = len(encode_path)
    box = box or box_2d(encode_path[0])
    nbox = (-4.0, 4.0, -4.0, 4.0)
    fig, axes = plt.subplots(2, k, figsize=(2.2 * k, 4.6), squeeze=False)
    for i, pts in enumerate(encode_path):
        _hist(axes[0, i], pts, box if i == 0 else nbox, bins=120, title="data" if i == 0 else f"after block {i}")
    for i, pts in enumerate(decode_path):
        j = k - 1 - i
        _hist(axes[1, i], pts, box if j == 0 else nbox, bins=120, title="noise" if i == 0 else f"before block {j + 1}")
    axes[0, 0].set_ylabel("encode (data to noise)")
    axes[1, 0].set_ylabel("decode (noise to data)")
    fig.suptitle("the chain of blocks, forward and inverse", fontsize=11)
    return _save(fig, path)


def plot_density_2d(log_prob_fn, path: Path, box, true_log_prob=None, resolution: int = 100) -> Path:
    """Heat map of the learned density (and the true one when known) on a grid over ``box``."""
    plt = _plt()
    xs = np.linspace(box[0], box[1], resolution)
    ys = np.linspace(box[2], box[3], resolution)
    grid = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    panels = [("learned density", np.asarray(log_prob_fn(grid)))]
    if true_log_prob is not None:
        panels.insert(0, ("true density", np.asarray(true_log_prob(grid))))
    # One colour scale for both panels, from the reference (the true density where known): a learned
    # density's narrow spikes would otherwise wash the picture out.
    top = _robust_max(np.exp(panels[0][1]), 99.0)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), squeeze=False)
    for ax, (title, lp) in zip(axes[0], panels, strict=False):
        density = np.exp(lp).reshape(resolution, resolution)
        ax.imshow(density, origin="lower", extent=box, cmap="magma", vmin=0.0, vmax=top, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)


def plot_losses(training_log: list[dict], path: Path) -> Path:
    """Flow-matching loss against step, one curve per block."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for rec in training_log:
        if rec.get("losses"):
            steps, losses = zip(*rec["losses"], strict=True)
            label = "free block" if rec["h"] is None else f"block {rec['block'] + 1} (h={rec['h']:.3g})"
            ax.plot(steps, losses, label=label, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_marginals(samples: np.ndarray, test: np.ndarray, path: Path, max_dims: int = 6) -> Path:
    """Marginal histograms (diagonal) and pairwise histograms of samples against test data."""
    plt = _plt()
    d = min(samples.shape[1], max_dims)
    fig, axes = plt.subplots(d, d, figsize=(2.1 * d, 2.1 * d), squeeze=False)
    lo = np.quantile(test[:, :d], 0.005, axis=0)
    hi = np.quantile(test[:, :d], 0.995, axis=0)
    for i in range(d):
        for j in range(d):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if i == j:
                bins = np.linspace(lo[i], hi[i], 60)
                ax.hist(test[:, i], bins=bins, density=True, alpha=0.5, label="test")
                ax.hist(samples[:, i], bins=bins, density=True, histtype="step", lw=1.3, label="samples")
            elif i > j:
                ax.hist2d(test[:, j], test[:, i], bins=60, range=[[lo[j], hi[j]], [lo[i], hi[i]]], cmap="Blues")
                ax.set_title("test" if (i, j) == (1, 0) else "", fontsize=8)
            else:
                ax.hist2d(samples[:, j], samples[:, i], bins=60, range=[[lo[j], hi[j]], [lo[i], hi[i]]], cmap="Oranges")
                ax.set_title("samples" if (i, j) == (0, 1) else "", fontsize=8)
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(f"marginals: first {d} of {samples.shape[1]} dimensions (lower: test, upper: samples)", fontsize=10)
    return _save(fig, path)


def image_grid(images: np.ndarray, ncol: int | None = None) -> np.ndarray:
    """Tile images (N, C, H, W) in [-1, 1] into one (rows*H, ncol*W, C) array in [0, 1], 1-pixel gaps."""
    x = (np.clip(np.asarray(images, dtype=np.float64), -1, 1) + 1) / 2
    n, c, h, w = x.shape
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / ncol))
    grid = np.ones((rows * (h + 1) - 1, ncol * (w + 1) - 1, c))
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[r * (h + 1) : r * (h + 1) + h, k * (w + 1) : k * (w + 1) + w] = x[i].transpose(1, 2, 0)
    return grid


def _show(ax, img: np.ndarray, title: str = "") -> None:
    if img.shape[-1] == 1:
        ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(img, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)


def plot_image_grids(panels: dict[str, np.ndarray], path: Path) -> Path:
    """One grid per panel, side by side: e.g. ``{"test images": x, "samples": s}``, (N, C, H, W) in [-1, 1]."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), squeeze=False)
    for ax, (title, images) in zip(axes[0], panels.items(), strict=True):
        _show(ax, image_grid(images), f"{title} ({len(images)})")
    return _save(fig, path)


def plot_image_blocks(encode_path: list[np.ndarray], decode_path: list[np.ndarray], path: Path) -> Path:
    """One image (C, H, W) after each block: top row data to noise, bottom row that noise back to data."""
    plt = _plt()
    k = len(encode_path)
    fig, axes = plt.subplots(2, k, figsize=(1.8 * k, 4.0), squeeze=False)
    for i, img in enumerate(encode_path):
        _show(axes[0, i], image_grid(img[None]), "data" if i == 0 else f"after block {i}")
    for i, img in enumerate(decode_path):
        j = k - 1 - i
        _show(axes[1, i], image_grid(img[None]), "noise" if i == 0 else f"before block {j + 1}")
    axes[0, 0].set_ylabel("encode")
    axes[1, 0].set_ylabel("decode")
    fig.suptitle("one test image through the chain of blocks and back (clipped to the data range)", fontsize=10)
    return _save(fig, path)


def to_numpy(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
