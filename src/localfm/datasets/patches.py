"""``patches``: 63-D natural-image patches in the BSDS300 recipe, a stand-in for BSDS300.

Photos: the natural photographs bundled with scikit-image (no download), in grayscale.
Recipe (as MAF's BSDS300): 8x8 patches of 8-bit grayscale pixels k, dequantised as
(k + U[0, 1)) / 256, minus the patch mean (DC), bottom-right pixel dropped -> 63 dimensions.
Splits: each photo is cut into 32x32 tiles and a fixed shuffle (RandomState(0)) assigns 80 % of
the tiles to train, 10 % to validation, 10 % to test; a patch lies inside one tile, so no two
splits share a pixel. Patch positions and dequantisation noise come from ``seed``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ._base import Dataset, require, split_rng

PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "rocket")
TILE = 32
PATCH = 8
SOURCE = "stand-in for BSDS300: 8x8 patches (BSDS300 recipe) of the photos bundled with scikit-image: " + ", ".join(
    PHOTOS
)
LICENCE = "public domain / CC0 (scikit-image's bundled photos, see skimage.data)"


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    data = require("skimage.data", "The patches dataset")
    color = require("skimage.color", "The patches dataset")
    out = []
    for name in PHOTOS:
        img = np.asarray(getattr(data, name)())
        if img.ndim == 3:
            img = np.round(color.rgb2gray(img[..., :3]) * 255.0)
        out.append(img.astype(np.uint8))
    return tuple(out)


def _tiles() -> dict[str, np.ndarray]:
    """(photo, row, col) of the top-left corner of every tile, per split."""
    tiles = []
    for p, img in enumerate(_photos()):
        for r in range(0, img.shape[0] - TILE + 1, TILE):
            for c in range(0, img.shape[1] - TILE + 1, TILE):
                tiles.append((p, r, c))
    tiles = np.array(tiles)
    order = np.random.RandomState(0).permutation(len(tiles))
    n_val = n_test = len(tiles) // 10
    return {
        "test": tiles[order[:n_test]],
        "val": tiles[order[n_test : n_test + n_val]],
        "train": tiles[order[n_test + n_val :]],
    }


def _cut(tiles: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    photos = _photos()
    pick = tiles[rng.integers(0, len(tiles), size=n)]
    dr = rng.integers(0, TILE - PATCH + 1, size=n)
    dc = rng.integers(0, TILE - PATCH + 1, size=n)
    out = np.empty((n, PATCH * PATCH), dtype=np.float64)
    off = np.arange(PATCH)
    for p, img in enumerate(photos):
        m = pick[:, 0] == p
        rows = (pick[m, 1] + dr[m])[:, None, None] + off[None, :, None]
        cols = (pick[m, 2] + dc[m])[:, None, None] + off[None, None, :]
        out[m] = img[rows, cols].reshape(-1, PATCH * PATCH)
    x = (out + rng.random(out.shape)) / 256.0
    x -= x.mean(axis=1, keepdims=True)
    return x[:, :-1].astype(np.float32)


def load_patches(sizes: tuple[int, int, int], seed: int = 0) -> Dataset:
    tiles = _tiles()
    arrays = {
        s: _cut(tiles[s], n, split_rng("patches", seed, s))
        for s, n in zip(("train", "val", "test"), sizes, strict=True)
    }
    return Dataset(
        name="patches", kind="tabular", source=SOURCE, licence=LICENCE, meta={"photos": PHOTOS, "tile": TILE}, **arrays
    )
