"""Image densities: a mixture of small isotropic Gaussians at the dark pixels of a picture.

Definition. Given a darkness raster ``ink`` (H, W) in [0, 1], the components are the pixels
with ``ink >= threshold``, weighted by their darkness; pixel (row i, column j) sits at
``((j + 0.5 - W/2) s, (H/2 - i - 0.5) s)`` with pixel width ``s = 2 half_width / max(H, W)``
(the picture fills the box [-half_width, half_width]^2 along its longer side, aspect kept),
and every component has standard deviation ``sigma_px * s``.

Evaluation of ``log_prob`` is exact up to a relative error below 1e-15 in the density:
points within a few pixels of ink use a (2R+1)^2 window around their pixel, accepted when
everything outside the window is provably below exp(-36) times the window's sum; the other
points use the components within a radius that bounds the rest the same way (found with a
k-d tree when scipy is installed, otherwise by a chunked sum over all components).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ._base import require
from .toy2d import on_finite_rows, segment_logsumexp

LOG_2PI = math.log(2.0 * math.pi)
#: accepted relative error of the density is exp(-TAIL)
TAIL = 36.0


class PixelMixture:
    """Mixture of isotropic Gaussians at the dark pixels of a raster (see the module docs)."""

    def __init__(self, ink: np.ndarray, *, sigma_px: float = 1.0, half_width: float = 4.0, threshold: float = 0.1):
        ink = np.asarray(ink, dtype=np.float64)
        if ink.ndim != 2:
            raise ValueError(f"ink must be a 2-D raster, got shape {ink.shape}")
        if not np.all(np.isfinite(ink)) or ink.min() < 0 or ink.max() > 1:
            raise ValueError("ink must hold finite values in [0, 1]")
        if sigma_px <= 0 or half_width <= 0 or not 0 < threshold <= 1:
            raise ValueError("need sigma_px > 0, half_width > 0 and 0 < threshold <= 1")
        rows, cols = np.nonzero(ink >= threshold)
        if len(rows) == 0:
            raise ValueError(f"the picture has no pixel with darkness >= {threshold}")
        self.shape = ink.shape
        self.sigma_px = float(sigma_px)
        self.pixel = 2.0 * half_width / max(ink.shape)
        self.sigma = self.sigma_px * self.pixel
        w = ink[rows, cols]
        self.weights = w / w.sum()
        self.rows, self.cols = rows.astype(np.float64), cols.astype(np.float64)
        self.centres = self._to_data(self.rows, self.cols)
        self.radius = int(math.ceil(10 * self.sigma_px))
        h, wd = ink.shape
        r = self.radius
        self._padded = np.full((h + 2 * r, wd + 2 * r), -np.inf)
        self._padded[rows + r, cols + r] = np.log(self.weights)
        self._tree = None

    def _to_data(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        h, w = self.shape
        return np.stack([(cols + 0.5 - w / 2) * self.pixel, (h / 2 - rows - 0.5) * self.pixel], 1)

    def _to_pixels(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = self.shape
        return h / 2 - 0.5 - x[:, 1] / self.pixel, x[:, 0] / self.pixel + w / 2 - 0.5

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        k = rng.choice(len(self.weights), size=n, p=self.weights)
        return self.centres[k] + self.sigma * rng.standard_normal((n, 2))

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        return on_finite_rows(self._log_prob, x)

    def _log_prob(self, x: np.ndarray) -> np.ndarray:
        out = np.empty(len(x))
        chunk = 4096
        for i in range(0, len(x), chunk):
            out[i : i + chunk] = self._log_prob_chunk(x[i : i + chunk])
        return out

    def _log_prob_chunk(self, x: np.ndarray) -> np.ndarray:
        # everything below is in pixel units; the normaliser 2 pi sigma^2 is in data units
        v, u = self._to_pixels(x)
        norm = LOG_2PI + 2 * math.log(self.sigma)
        h, w = self.shape
        r = self.radius
        out = np.full(len(x), np.nan)
        ri, rj = np.rint(v), np.rint(u)
        inside = (ri >= 0) & (ri <= h - 1) & (rj >= 0) & (rj <= w - 1)
        idx = np.flatnonzero(inside)
        if len(idx):
            off = np.arange(-r, r + 1)
            rr = (ri[idx, None] + off[None]).astype(np.int64)  # (m, 2r+1) canvas rows
            cc = (rj[idx, None] + off[None]).astype(np.int64)
            logw = self._padded[(rr + r)[:, :, None], (cc + r)[:, None, :]]
            dv2 = (v[idx, None] - rr) ** 2 / (2 * self.sigma_px**2)
            du2 = (u[idx, None] - cc) ** 2 / (2 * self.sigma_px**2)
            terms = logw - dv2[:, :, None] - du2[:, None, :]
            m = terms.max(axis=(1, 2))
            m_safe = np.where(np.isfinite(m), m, 0.0)
            with np.errstate(divide="ignore"):
                lse = np.log(np.exp(terms - m_safe[:, None, None]).sum(axis=(1, 2))) + m_safe
            # every component outside the window is >= r + 0.5 pixels away
            outside_bound = -((r + 0.5) ** 2) / (2 * self.sigma_px**2)
            ok = lse >= outside_bound + TAIL
            out[idx[ok]] = lse[ok] - norm
        rest = np.flatnonzero(np.isnan(out))
        if len(rest):
            out[rest] = self._far(v[rest], u[rest]) - norm
        return out

    def _far(self, v: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Exact log sum_k w_k exp(-d_k^2 / 2 sigma_px^2) for points far from ink."""
        s2 = self.sigma_px**2
        pts = np.stack([v, u], 1)
        comps = np.stack([self.rows, self.cols], 1)
        try:
            from scipy.spatial import cKDTree
        except ImportError:
            cKDTree = None
        if cKDTree is None:
            out = np.empty(len(v))
            for i in range(0, len(v), 256):
                d2 = ((pts[i : i + 256, None, :] - comps[None]) ** 2).sum(-1)
                terms = np.log(self.weights)[None] - d2 / (2 * s2)
                m = terms.max(1, keepdims=True)
                out[i : i + 256] = (np.log(np.exp(terms - m).sum(1, keepdims=True)) + m)[:, 0]
            return out
        if self._tree is None:
            self._tree = cKDTree(comps)
        dmin, _ = self._tree.query(pts)
        # the nearest component gives at least w_min exp(-dmin^2 / 2 s2); those beyond radius
        # rad add at most exp(-rad^2 / 2 s2) in total
        rad = np.sqrt(dmin**2 + 2 * s2 * (TAIL - math.log(self.weights.min())))
        lists = self._tree.query_ball_point(pts, rad, return_sorted=False)
        counts = np.fromiter((len(lst) for lst in lists), dtype=np.int64, count=len(lists))
        comp = np.concatenate([np.asarray(lst, dtype=np.int64) for lst in lists])
        owner = np.repeat(np.arange(len(pts)), counts)
        d2 = ((pts[owner] - comps[comp]) ** 2).sum(-1)
        return segment_logsumexp(np.log(self.weights[comp]) - d2 / (2 * s2), owner, len(pts))


def read_picture(path: str | Path, *, max_side: int = 256) -> np.ndarray:
    """Read a PNG/JPEG as a darkness raster in [0, 1] (1 = black), at most ``max_side`` pixels
    along its longer side. Transparent pixels count as white; colour is converted to
    luminance (0.2125 R + 0.7154 G + 0.0721 B)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"picture {str(path)!r} does not exist")
    io = require("skimage.io", "Reading a picture (image:PATH)")
    img = np.asarray(io.imread(str(path)))
    if img.dtype == np.uint8:
        img = img / 255.0
    elif img.dtype == np.uint16:
        img = img / 65535.0
    elif img.dtype == bool:
        img = img.astype(np.float64)
    else:
        img = img.astype(np.float64)
        if img.max() > 1.0:
            img = img / 255.0
    if img.ndim == 3:
        if img.shape[2] in (2, 4):  # grey/colour with alpha: composite over white
            alpha = img[..., -1:]
            img = img[..., :-1] * alpha + (1.0 - alpha)
        if img.shape[2] >= 3:
            img = img[..., :3] @ np.array([0.2125, 0.7154, 0.0721])
        else:
            img = img[..., 0]
    if img.ndim != 2:
        raise ValueError(f"picture {str(path)!r} has unsupported shape {img.shape}")
    if max(img.shape) > max_side:
        transform = require("skimage.transform", "Resizing a picture (image:PATH)")
        f = max_side / max(img.shape)
        new = (max(1, round(img.shape[0] * f)), max(1, round(img.shape[1] * f)))
        img = transform.resize(img, new, anti_aliasing=True)
    return np.clip(1.0 - img, 0.0, 1.0)
