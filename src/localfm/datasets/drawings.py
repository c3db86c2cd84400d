"""Pictures we draw ourselves, as anti-aliased "darkness" rasters in [0, 1] (1 = ink).

Shapes are rasterised analytically: a pixel's coverage is ``clip(0.5 - signed_distance, 0, 1)``
(a one-pixel linear ramp across the edge), and overlapping strokes combine by maximum.
Coordinates are (x, y) = (column, row) in pixels with pixel centres at integer + 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


class Canvas:
    """A darkness raster with anti-aliased capsule strokes and lens-shaped fills."""

    def __init__(self, height: int, width: int):
        self.ink = np.zeros((height, width))

    def _window(self, x0: float, x1: float, y0: float, y1: float):
        h, w = self.ink.shape
        c0, c1 = max(int(math.floor(x0)), 0), min(int(math.ceil(x1)) + 1, w)
        r0, r1 = max(int(math.floor(y0)), 0), min(int(math.ceil(y1)) + 1, h)
        if c0 >= c1 or r0 >= r1:
            return None
        xs = np.arange(c0, c1) + 0.5
        ys = np.arange(r0, r1) + 0.5
        return (slice(r0, r1), slice(c0, c1)), xs[None, :], ys[:, None]

    def stroke(self, p, q, r0: float, r1: float | None = None, darkness: float = 1.0) -> None:
        """Segment p -> q whose half-width goes linearly from r0 to r1 (rounded caps)."""
        r1 = r0 if r1 is None else r1
        pad = max(r0, r1) + 1.0
        win = self._window(min(p[0], q[0]) - pad, max(p[0], q[0]) + pad, min(p[1], q[1]) - pad, max(p[1], q[1]) + pad)
        if win is None:
            return
        sl, xs, ys = win
        dx, dy = q[0] - p[0], q[1] - p[1]
        len2 = dx * dx + dy * dy
        t = np.zeros(np.broadcast(xs, ys).shape)
        if len2 > 0:
            t = np.clip(((xs - p[0]) * dx + (ys - p[1]) * dy) / len2, 0.0, 1.0)
        dist = np.hypot(xs - p[0] - t * dx, ys - p[1] - t * dy)
        cover = np.clip(r0 + t * (r1 - r0) - dist + 0.5, 0.0, 1.0)
        self.ink[sl] = np.maximum(self.ink[sl], darkness * cover)

    def curve(self, pts: np.ndarray, radius: float, darkness: float = 1.0) -> None:
        for a, b in zip(pts[:-1], pts[1:], strict=True):
            self.stroke(a, b, radius, radius, darkness)

    def lens(self, tip_a, tip_b, half_width: float, darkness: float = 1.0) -> None:
        """Filled leaf shape: the intersection of two discs whose circles meet at both tips."""
        a, b = np.asarray(tip_a, float), np.asarray(tip_b, float)
        half = 0.5 * np.linalg.norm(b - a)
        h = (half**2 - half_width**2) / (2 * half_width)
        radius = h + half_width
        normal = np.array([-(b - a)[1], (b - a)[0]]) / (2 * half)
        mid = 0.5 * (a + b)
        c1, c2 = mid + h * normal, mid - h * normal
        lo, hi = np.minimum(a, b) - half_width - 1, np.maximum(a, b) + half_width + 1
        win = self._window(lo[0], hi[0], lo[1], hi[1])
        if win is None:
            return
        sl, xs, ys = win
        sd = np.maximum(np.hypot(xs - c1[0], ys - c1[1]), np.hypot(xs - c2[0], ys - c2[1]))
        cover = np.clip(0.5 - (sd - radius), 0.0, 1.0)
        self.ink[sl] = np.maximum(self.ink[sl], darkness * cover)


@dataclass(frozen=True)
class TreeDrawing:
    """The tree raster plus its skeleton, for structural checks."""

    ink: np.ndarray  # (H, W) darkness in [0, 1]
    tips: np.ndarray  # (2^(levels-1), 2) twig end points, pixels (x, y)
    levels: int
    radii: tuple[float, ...]  # stroke half-width at the start of each level, pixels
    forks: np.ndarray  # (2^(levels-1) - 1, 2, 2, 2): per fork, its two children's (start, end), pixels (x, y)
    fork_levels: np.ndarray  # (2^(levels-1) - 1,) the children's level (1 = the trunk's fork)

    def fork_probes(self, fraction: float = 0.75) -> tuple[np.ndarray, np.ndarray]:
        """Points to tell whether a picture of the tree shows a fork: a point ``fraction`` of the way
        along each child, ``on`` (F, 2, 2), and the midpoint between the two, ``gap`` (F, 2), where
        the wedge between sibling branches is empty. Pixels (x, y), in the order of ``forks``."""
        on = self.forks[:, :, 0] + fraction * (self.forks[:, :, 1] - self.forks[:, :, 0])
        return on, on.mean(axis=1)


@lru_cache(maxsize=4)
def draw_tree(size: int = 256, levels: int = 10) -> TreeDrawing:
    """A fractal tree: a trunk that forks ``levels - 1`` times (2^(levels-1) twigs).

    Each branch forks into two children turned by about +-25 degrees and pulled slightly
    towards the vertical; lengths shrink by 0.74 and stroke half-widths by 0.68 per level
    (trunk 8 px, twigs 0.6 px at 256 px). A fixed RandomState(7) adds small irregularities,
    so the drawing is always the same.
    """
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    rng = np.random.RandomState(7)
    segments = []  # (p, q, level)
    forks = []  # indices into segments of the two children of one branch

    def grow(p, angle, length, level) -> int:
        q = (p[0] + length * math.sin(angle), p[1] + length * math.cos(angle))
        segments.append((p, q, level))
        index = len(segments) - 1
        if level + 1 < levels:
            children = []
            for side in (-1.0, 1.0):
                turn = side * math.radians(25.0 + rng.uniform(-6.0, 6.0))
                child = 0.88 * (angle + turn)  # pull towards the vertical keeps a crown shape
                children.append(grow(q, child, length * 0.74 * rng.uniform(0.9, 1.1), level + 1))
            forks.append(children)
        return index

    grow((0.0, 0.0), 0.0, 1.0, 0)
    ends = np.array([pt for p, q, _ in segments for pt in (p, q)])
    lo, hi = ends.min(0), ends.max(0)
    margin = 0.06 * size
    scale = min((size - 2 * margin) / (hi[0] - lo[0]), (size - 2 * margin) / (hi[1] - lo[1]))

    def to_px(pt):  # y grows upwards in the tree's frame, downwards in the raster
        return (size / 2 + (pt[0] - 0.5 * (lo[0] + hi[0])) * scale, size - margin - (pt[1] - lo[1]) * scale)

    r_trunk = 8.0 * size / 256
    radii = tuple(max(r_trunk * 0.68**lev, 0.6) for lev in range(levels + 1))
    canvas = Canvas(size, size)
    tips = []
    for p, q, lev in segments:
        canvas.stroke(to_px(p), to_px(q), radii[lev], radii[lev + 1])
        if lev == levels - 1:
            tips.append(to_px(q))
    segments_px = np.array([[to_px(p), to_px(q)] for p, q, _ in segments])
    fork_levels = np.array([segments[a][2] for a, _ in forks])
    return TreeDrawing(canvas.ink, np.array(tips), levels, radii[:levels], segments_px[np.array(forks)], fork_levels)


#: a fork counts as drawn when the density on its two branches is at least twice that between them
FORK_CONTRAST = math.log(2.0)


def branching_levels(log_density, drawing: TreeDrawing, pixel: float, fraction: float = 0.75) -> dict:
    """How many levels of the tree's forks a density shows.

    ``log_density`` maps points in data units, (n, 2), to log-densities; the drawing fills the box
    [-W/2, W/2] x [-H/2, H/2] pixels of width ``pixel`` (as :class:`PixelMixture` places it). Per
    fork: the mean log-density at the two children's probe points minus the log-density in the
    gap between them (:meth:`TreeDrawing.fork_probes`). ``contrast[l - 1]`` is the median over the
    forks of level ``l``; ``levels`` counts the levels, from the trunk's fork outwards, whose
    median contrast is at least ``FORK_CONTRAST`` (the branches at least twice as dense as the gap).
    """
    on, gap = drawing.fork_probes(fraction)
    level = drawing.fork_levels
    h, w = drawing.ink.shape

    def to_data(px: np.ndarray) -> np.ndarray:
        return np.stack([(px[..., 0] - w / 2) * pixel, (h / 2 - px[..., 1]) * pixel], -1).reshape(-1, 2)

    lp = np.asarray(log_density(np.concatenate([to_data(on), to_data(gap)])), dtype=np.float64)
    n = len(gap)
    contrast = lp[: 2 * n].reshape(n, 2).mean(1) - lp[2 * n :]
    per_level = [float(np.median(contrast[level == lv])) for lv in range(1, drawing.levels)]
    shown = next((i for i, c in enumerate(per_level) if not c >= FORK_CONTRAST), len(per_level))
    return {"levels": shown, "of": len(per_level), "contrast": per_level}


def _bezier(p0, p1, p2, n: int = 60) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * np.asarray(p0) + 2 * (1 - t) * t * np.asarray(p1) + t**2 * np.asarray(p2)


@lru_cache(maxsize=4)
def draw_rose(size: int = 256) -> np.ndarray:
    """A rose: rhodonea-style petal outlines around a spiral bud, a curved stem, two leaves."""
    u = size / 256
    canvas = Canvas(size, size)
    cx, cy = 128 * u, 88 * u
    theta = np.linspace(0.0, 2 * np.pi, 721)
    # petal layers: scalloped rhodonea outlines r = R (a + b |cos(5 theta / 2)|), rotated
    for radius, rot, a in ((70, 0.0, 0.62), (50, np.pi / 5, 0.58), (32, 0.0, 0.55)):
        r = radius * u * (a + (1 - a) * np.abs(np.cos(2.5 * (theta - rot))))
        canvas.curve(np.stack([cx + r * np.cos(theta), cy + r * np.sin(theta)], 1), 1.3 * u)
    # inner petals: a five-petal rhodonea r = R cos(5 theta)
    r = 22 * u * np.cos(5 * theta[:361])
    canvas.curve(np.stack([cx + r * np.cos(theta[:361]), cy + r * np.sin(theta[:361])], 1), 1.0 * u)
    # bud: a spiral
    t = np.linspace(0.0, 4 * np.pi, 240)
    r = (2 + 10 * t / (4 * np.pi)) * u
    canvas.curve(np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1), 1.0 * u)
    # stem
    stem = _bezier((cx, cy + 62 * u), (cx + 16 * u, 190 * u), (cx - 10 * u, 250 * u))
    for a, b, f in zip(stem[:-1], stem[1:], np.linspace(0, 1, len(stem) - 1), strict=True):
        canvas.stroke(a, b, (2.2 + 1.2 * f) * u)
    # leaves, each with a midrib
    for k, (tip_dx, tip_dy) in ((22, (-46, -24)), (36, (44, -20))):
        base = stem[k]
        tip = (base[0] + tip_dx * u, base[1] + tip_dy * u)
        canvas.lens(base, tip, 10 * u, darkness=0.6)
        canvas.stroke(base, tip, 0.8 * u)
    return canvas.ink
