"""Two-dimensional toy densities with exact log-densities.

Every density here is an object with ``log_prob(x)`` (``x``: ``(n, 2)``, returns float64 ``(n,)``)
and ``sample(n, rng)``, and both describe the same distribution exactly (no fitted surrogate):

- ``8gaussians``: equal mixture of N(mu_k, s^2 I), mu_k = 2*sqrt(2) (cos k pi/4, sin k pi/4),
  s = 0.5/sqrt(2) (FFJORD's toy after its division by 1.414).
- ``checkerboard``: uniform on the 8 cells ``[2i, 2i+2) x [2j, 2j+2)``, i, j in {-2..1},
  i + j even (density 1/32 inside, log 0 = -inf outside).
- ``pinwheel``: five arms; class k, f = (f0, f1), f0 ~ N(1, 0.3^2), f1 ~ N(0, 0.1^2)
  conditioned on |f| <= 6 (which removes mass below 1e-57), x = 2 R(2 pi k/5 + 0.25 exp(f0)) f.
  The density is the exact push-forward: in polar coordinates |x/2| = |f| = rho and the angle
  of f, alpha, solves
  alpha + 0.25 exp(rho cos alpha) = angle(x) - 2 pi k/5 (mod 2 pi), so
  p(x) = 1/4 * 1/5 sum_k sum_roots N(f) / |1 - 0.25 rho sin(alpha) exp(rho cos alpha)|
  for rho <= 6, and 0 beyond.
  Roots are bracketed on a grid of 256 angles and refined by safeguarded Newton to 1e-13 rad.
  Pairs of roots closer than the grid spacing occur only next to fold caustics of the map
  (where |f1| exp(f0) = 4, so the Gaussian weight of f is below exp(-17) of its peak);
  only there may a pair be missed.
- ``circles`` and ``rings``: uniform measure on circles convolved with N(0, s^2 I); exact
  closed form p(x) = sum_k w_k exp(-(r - R_k)^2 / 2 s^2) i0e(r R_k / s^2) / (2 pi s^2).
- ``moons``, ``swissroll``, ``2spirals``: the uniform measure (in arc length) on a curve
  convolved with N(0, s^2 I). The curve *is* the polyline through nodes of the analytic curve
  spaced s apart in arc length (its distance from the analytic curve is below kappa s^2 / 8,
  kappa the curvature: at most 0.075 s, at the centre of the spirals);
  the line integral of a Gaussian along each straight segment is a closed form (erf), so the
  log-density has no quadrature error. Segments whose total contribution is below exp(-37)
  times the nearest segment's are skipped (relative error < 1e-16, i.e. float64 round-off).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

LOG_2PI = math.log(2.0 * math.pi)


def _as_points(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"x must have shape (n, 2), got {x.shape}")
    return x


def on_finite_rows(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """``fn`` on the rows of ``x`` without nan/inf; other rows give nan."""
    x = _as_points(x)
    ok = np.all(np.isfinite(x), axis=1)
    if ok.all():
        return fn(x)
    out = np.full(len(x), np.nan)
    if ok.any():
        out[ok] = fn(x[ok])
    return out


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True)) + m
    return np.squeeze(out, axis=axis)


def segment_logsumexp(values: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    """``out[i] = log sum_{j: index[j] == i} exp(values[j])`` (-inf for empty groups)."""
    out = np.full(n, -np.inf)
    if values.size == 0:
        return out
    order = np.argsort(index, kind="stable")
    values, index = values[order], index[order]
    starts = np.flatnonzero(np.r_[True, index[1:] != index[:-1]])
    m = np.maximum.reduceat(values, starts)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    s = np.add.reduceat(np.exp(values - np.repeat(m_safe, np.diff(np.r_[starts, len(values)]))), starts)
    with np.errstate(divide="ignore"):
        out[index[starts]] = np.log(s) + m_safe
    return out


# ---------------------------------------------------------------------------------------------
# mixtures


@dataclass(frozen=True)
class GaussianMixture2D:
    """Equal-variance isotropic Gaussian mixture."""

    means: np.ndarray  # (K, 2)
    weights: np.ndarray  # (K,)
    sigma: float

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        return on_finite_rows(self._log_prob, x)

    def _log_prob(self, x: np.ndarray) -> np.ndarray:
        d2 = ((x[:, None, :] - self.means[None]) ** 2).sum(-1)
        comp = np.log(self.weights)[None] - d2 / (2 * self.sigma**2)
        return _logsumexp(comp, axis=1) - LOG_2PI - 2 * math.log(self.sigma)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        k = rng.choice(len(self.weights), size=n, p=self.weights)
        return self.means[k] + self.sigma * rng.standard_normal((n, 2))


def eight_gaussians() -> GaussianMixture2D:
    angles = np.arange(8) * (np.pi / 4)
    means = 2.0 * math.sqrt(2.0) * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return GaussianMixture2D(means=means, weights=np.full(8, 1 / 8), sigma=0.5 / math.sqrt(2.0))


@dataclass(frozen=True)
class Checkerboard:
    """Uniform on the cells [2i, 2i+2) x [2j, 2j+2), i, j in {-2, -1, 0, 1}, i + j even."""

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        return on_finite_rows(self._log_prob, x)

    def _log_prob(self, x: np.ndarray) -> np.ndarray:
        cell = np.floor(x / 2.0)
        inside = np.all((cell >= -2) & (cell <= 1), axis=1) & ((cell.sum(1) % 2) == 0)
        return np.where(inside, -math.log(32.0), -np.inf)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        cells = np.array([(i, j) for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0])
        k = rng.integers(0, len(cells), size=n)
        return 2.0 * (cells[k] + rng.random((n, 2)))


# ---------------------------------------------------------------------------------------------
# pinwheel


@dataclass(frozen=True)
class Pinwheel:
    """Exact push-forward density of FFJORD-style pinwheel arms (see the module docstring)."""

    n_arms: int = 5
    radial_std: float = 0.3
    tangential_std: float = 0.1
    rate: float = 0.25
    scale: float = 2.0
    grid: int = 256
    #: the Gaussian of f is conditioned on |f| <= rho_max (it loses mass < 1e-57)
    rho_max: float = 6.0

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        k = rng.integers(0, self.n_arms, size=n)
        f0 = 1.0 + self.radial_std * rng.standard_normal(n)
        f1 = self.tangential_std * rng.standard_normal(n)
        while np.any(far := np.hypot(f0, f1) > self.rho_max):  # never in practice
            f0[far] = 1.0 + self.radial_std * rng.standard_normal(far.sum())
            f1[far] = self.tangential_std * rng.standard_normal(far.sum())
        a = 2 * np.pi * k / self.n_arms + self.rate * np.exp(f0)
        c, s = np.cos(a), np.sin(a)
        return self.scale * np.stack([c * f0 - s * f1, s * f0 + c * f1], axis=1)

    def _refine_roots(self, h, r, a_lo, a_hi):
        """Safeguarded Newton on brackets [a_lo, a_hi] where h changes sign."""
        h_lo = h(a_lo)
        a = 0.5 * (a_lo + a_hi)
        for _ in range(60):
            ha = h(a)
            same = np.sign(ha) == np.sign(h_lo)
            a_lo, h_lo = np.where(same, a, a_lo), np.where(same, ha, h_lo)
            a_hi = np.where(same, a_hi, a)
            dh = (1.0 - self.rate * r * np.sin(a) * np.exp(r * np.cos(a))) / (2 * np.pi)
            with np.errstate(divide="ignore", invalid="ignore"):
                newton = a - ha / dh
            inside = (newton >= a_lo) & (newton <= a_hi)
            a_new = np.where(inside, newton, 0.5 * (a_lo + a_hi))
            if np.all(np.abs(a_new - a) <= 1e-13):
                return a_new
            a = a_new
        return a

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        return on_finite_rows(self._log_prob, x)

    def _log_prob(self, x: np.ndarray) -> np.ndarray:
        out = np.empty(len(x))
        chunk = max(1, 2_000_000 // (self.grid + 1))
        for i in range(0, len(x), chunk):
            out[i : i + chunk] = self._log_prob_chunk(x[i : i + chunk])
        return out

    def _log_prob_chunk(self, x: np.ndarray) -> np.ndarray:
        rho = np.hypot(x[:, 0], x[:, 1]) / self.scale
        out = np.full(len(x), -np.inf)
        near = rho <= self.rho_max
        if near.any():
            out[near] = self._log_prob_near(x[near])
        return out

    def _log_prob_near(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        z = x / self.scale
        rho = np.hypot(z[:, 0], z[:, 1])
        phi = np.arctan2(z[:, 1], z[:, 0])
        alpha = np.linspace(-np.pi, np.pi, self.grid + 1)
        # u(alpha) = (alpha + rate * exp(rho cos alpha) - phi) / 2 pi; roots: u - k/K integer
        base = (alpha[None] + self.rate * np.exp(rho[:, None] * np.cos(alpha)[None]) - phi[:, None]) / (2 * np.pi)
        idx_all, lo_all, m_all = [], [], []
        for k in range(self.n_arms):
            u = base + k / self.n_arms
            fl = np.floor(u)
            jump = fl[:, 1:] - fl[:, :-1]
            pi_, seg = np.nonzero(jump)
            count = np.abs(jump[pi_, seg]).astype(np.int64)
            low = np.minimum(fl[pi_, seg], fl[pi_, seg + 1])
            rep = np.repeat(np.arange(len(pi_)), count)
            offset = np.arange(len(rep)) - np.repeat(np.cumsum(count) - count, count)
            idx_all.append(pi_[rep])
            lo_all.append(seg[rep])
            m_all.append(low[rep] + 1 + offset - k / self.n_arms)
        idx = np.concatenate(idx_all)
        seg = np.concatenate(lo_all)
        target = np.concatenate(m_all)
        r = rho[idx]

        def h(a: np.ndarray) -> np.ndarray:
            return (a + self.rate * np.exp(r * np.cos(a)) - phi[idx]) / (2 * np.pi) - target

        a = self._refine_roots(h, r, alpha[seg], alpha[seg + 1])
        f0, f1 = r * np.cos(a), r * np.sin(a)
        dphi = 1.0 - self.rate * r * np.sin(a) * np.exp(f0)
        with np.errstate(divide="ignore"):
            terms = (
                -0.5 * ((f0 - 1.0) / self.radial_std) ** 2
                - 0.5 * (f1 / self.tangential_std) ** 2
                - LOG_2PI
                - math.log(self.radial_std * self.tangential_std)
                - np.log(np.abs(dphi))
            )
        out = segment_logsumexp(terms, idx, n)
        return out - math.log(self.n_arms) - 2 * math.log(self.scale)


# ---------------------------------------------------------------------------------------------
# curves convolved with a Gaussian


@dataclass(frozen=True)
class CircleMixture:
    """Uniform measure on centred circles of radii R_k (weights w_k) convolved with N(0, s^2 I)."""

    radii: np.ndarray
    weights: np.ndarray
    sigma: float

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        k = rng.choice(len(self.radii), size=n, p=self.weights)
        theta = rng.uniform(0.0, 2 * np.pi, size=n)
        pts = self.radii[k, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)
        return pts + self.sigma * rng.standard_normal((n, 2))

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        return on_finite_rows(self._log_prob, x)

    def _log_prob(self, x: np.ndarray) -> np.ndarray:
        import torch

        r = np.hypot(x[:, 0], x[:, 1])[:, None]
        s2 = self.sigma**2
        i0e = torch.special.i0e(torch.from_numpy(r * self.radii[None] / s2)).numpy()
        comp = np.log(self.weights)[None] - (r - self.radii[None]) ** 2 / (2 * s2) + np.log(i0e)
        return _logsumexp(comp, axis=1) - LOG_2PI - math.log(s2)


@dataclass(frozen=True)
class PolylineDensity:
    """Uniform measure along straight segments P_j -> Q_j (segment j has mass w_j) convolved
    with N(0, s^2 I). Exact: each segment contributes
    w_j / l_j * N1(d_perp; s) * [Phi((l_j - t)/s) - Phi(-t/s)],
    with t the coordinate of x along the segment and d_perp its distance to the segment's line.
    """

    starts: np.ndarray  # (S, 2)
    ends: np.ndarray  # (S, 2)
    weights: np.ndarray  # (S,), sums to 1
    sigma: float

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        j = rng.choice(len(self.weights), size=n, p=self.weights)
        tau = rng.random(n)[:, None]
        pts = self.starts[j] + tau * (self.ends[j] - self.starts[j])
        return pts + self.sigma * rng.standard_normal((n, 2))

    #: consecutive segments per bounding circle of the two-level search
    group: int = 8

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        return on_finite_rows(self._log_prob, x)

    def _log_prob(self, x: np.ndarray) -> np.ndarray:
        out = np.empty(len(x))
        chunk = 20_000
        for i in range(0, len(x), chunk):
            out[i : i + chunk] = self._log_prob_chunk(x[i : i + chunk])
        return out

    def _log_prob_chunk(self, y: np.ndarray) -> np.ndarray:
        import torch

        s = self.sigma
        seg = self.ends - self.starts
        length = np.hypot(seg[:, 0], seg[:, 1])
        e = seg / length[:, None]
        # Terms more than exp(-37) below the nearest segment's are skipped: the nearest
        # segment's term is at least w/l * min(l, s) * N2(dmin + s), any other at most
        # w * N2(dist), which gives the slack below (in units of 2 s^2 on squared distances).
        log_ratio = np.max(np.log(length / (self.weights * np.minimum(length, s))))

        def slack(dist: np.ndarray) -> np.ndarray:
            return 2 * s**2 * (37.5 + dist / s + log_ratio)

        # level 1: bounding circles of groups of segments give a conservative candidate set
        n_seg, g = len(length), self.group
        first = np.arange(0, n_seg, g)
        pts = np.concatenate([self.starts, self.ends])
        owner = np.concatenate([np.arange(n_seg), np.arange(n_seg)]) // g
        centre = np.stack([np.bincount(owner, pts[:, k]) for k in (0, 1)], 1)
        centre /= np.bincount(owner)[:, None]
        radius = np.zeros(len(first))
        np.maximum.at(radius, owner, np.hypot(*(pts - centre[owner]).T))
        dc = np.hypot(y[:, None, 0] - centre[None, :, 0], y[:, None, 1] - centre[None, :, 1])
        lower = np.maximum(dc - radius[None], 0.0)
        upper = (dc + radius[None]).min(axis=1)
        pi, ci = np.nonzero(lower**2 <= (upper**2 + slack(upper))[:, None])
        # level 2: segments of the candidate groups
        jj = (first[ci][:, None] + np.arange(g)[None]).ravel()
        ii = np.repeat(pi, g)
        valid = jj < n_seg
        ii, jj = ii[valid], jj[valid]
        d = y[ii] - self.starts[jj]
        along = d[:, 0] * e[jj, 0] + d[:, 1] * e[jj, 1]
        perp = d[:, 1] * e[jj, 0] - d[:, 0] * e[jj, 1]
        outside = np.maximum(np.maximum(-along, along - length[jj]), 0.0)
        dist2 = perp**2 + outside**2
        dmin2 = np.full(len(y), np.inf)
        np.minimum.at(dmin2, ii, dist2)
        keep = dist2 - dmin2[ii] <= slack(np.sqrt(dmin2))[ii]
        ii, jj, along, perp = ii[keep], jj[keep], along[keep], perp[keep]
        t_along, t_len = torch.from_numpy(along), torch.from_numpy(length[jj])
        const = np.log(self.weights[jj] / length[jj]) - 0.5 * LOG_2PI - math.log(s)
        terms = torch.from_numpy(const - 0.5 * (perp / s) ** 2) + _log_ndtr_diff(
            torch, -t_along / s, (t_len - t_along) / s
        )
        return segment_logsumexp(terms.numpy(), ii, len(y))


def _log_ndtr_diff(torch, lo, hi):
    """log(Phi(hi) - Phi(lo)) for lo < hi, accurate in both tails."""
    flip = (lo + hi) > 0
    a = torch.where(flip, -hi, lo)  # Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)
    b = torch.where(flip, -lo, hi)
    la, lb = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    return lb + torch.log(-torch.expm1(la - lb))


def polyline(curve: Callable[[np.ndarray], np.ndarray], t0: float, t1: float, spacing: float) -> np.ndarray:
    """Nodes of ``curve`` on [t0, t1] spaced ``spacing`` apart in arc length, shape (K+1, 2)."""
    t = np.linspace(t0, t1, 200_001)
    pts = curve(t)
    cum = np.r_[0.0, np.cumsum(np.hypot(*np.diff(pts, axis=0).T))]
    k = max(1, math.ceil(cum[-1] / spacing))
    return curve(np.interp(np.linspace(0.0, cum[-1], k + 1), cum, t))


def polyline_density(curves: list[np.ndarray], weights: list[float], sigma: float) -> PolylineDensity:
    """Each polyline gets mass ``weights[i]``, spread uniformly in arc length along it."""
    starts, ends, w = [], [], []
    for nodes, wc in zip(curves, weights, strict=True):
        seg_len = np.hypot(*np.diff(nodes, axis=0).T)
        starts.append(nodes[:-1])
        ends.append(nodes[1:])
        w.append(wc * seg_len / seg_len.sum())
    w_all = np.concatenate(w)
    return PolylineDensity(np.concatenate(starts), np.concatenate(ends), w_all / w_all.sum(), sigma)


def swissroll() -> PolylineDensity:
    sigma = 0.2

    def curve(t):
        return np.stack([t * np.cos(t), t * np.sin(t)], axis=1) / 5.0

    return polyline_density([polyline(curve, 1.5 * np.pi, 4.5 * np.pi, sigma)], [1.0], sigma)


def moons() -> PolylineDensity:
    sigma = 0.2

    def upper(t):
        return np.stack([2 * np.cos(t) - 1.0, 2 * np.sin(t) - 0.2], axis=1)

    def lower(t):
        return np.stack([1.0 - 2 * np.cos(t), 0.8 - 2 * np.sin(t)], axis=1)

    nodes = [polyline(c, 0.0, np.pi, sigma) for c in (upper, lower)]
    return polyline_density(nodes, [0.5, 0.5], sigma)


def two_spirals() -> PolylineDensity:
    sigma = 0.1

    def arm(t):
        return np.stack([-t * np.cos(t), t * np.sin(t)], axis=1) / 3.0

    nodes = polyline(arm, 0.0, 3 * np.pi, sigma)
    return polyline_density([nodes, -nodes], [0.5, 0.5], sigma)


def circles() -> CircleMixture:
    return CircleMixture(np.array([3.0, 1.5]), np.array([0.5, 0.5]), 0.24)


def rings() -> CircleMixture:
    return CircleMixture(np.array([3.0, 2.25, 1.5, 0.75]), np.full(4, 0.25), 0.08)


#: name -> (constructor, one-line definition for the registry)
TOYS: dict[str, tuple[Callable[[], object], str]] = {
    "checkerboard": (Checkerboard, "uniform on 8 checkerboard cells of side 2 in [-4, 4]^2"),
    "8gaussians": (eight_gaussians, "8 Gaussians, radius 2*sqrt(2), std 0.354"),
    "pinwheel": (Pinwheel, "5 pinwheel arms, exact push-forward of a Gaussian"),
    "swissroll": (swissroll, "swiss roll curve (t cos t, t sin t)/5 * N(0, 0.2^2)"),
    "moons": (moons, "two half circles of radius 2 * N(0, 0.2^2)"),
    "circles": (circles, "circles r = 3, 1.5 (equal mass) * N(0, 0.24^2)"),
    "2spirals": (two_spirals, "two Archimedean spirals r = t/3, t <= 3 pi, * N(0, 0.1^2)"),
    "rings": (rings, "rings r = 3, 2.25, 1.5, 0.75 (equal mass) * N(0, 0.08^2)"),
}
