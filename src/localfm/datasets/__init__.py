"""Datasets for localfm experiments: fixed splits, sources, licences, true densities.

>>> from localfm.datasets import load, list_datasets
>>> ds = load("8gaussians", seed=0)
>>> ds.train.shape, ds.kind
((100000, 2), '2d')

Kinds: "2d" (toy densities with exact ``log_prob`` and ``sampler``), "tabular" (POWER, GAS,
HEPMASS, MINIBOONE, BSDS300 in MAF's preprocessing, and ``patches``), "image" ((N, C, H, W)
float32 in [-1, 1]; see `images` for the scaling and bits/dim convention). Standardisation is
left to the model, except where a published recipe z-scores (the MAF tabular sets).
Optional dependencies are imported only by the loaders that need them:
``pip install 'localfm[data]'``.
"""

from ._base import Dataset, DatasetInfo, EntropyEstimate, SplitLabels
from .images import bits_per_dim, dequantize, parse_idx, read_cifar_batch, read_idx
from .registry import list_datasets, load, true_entropy
from .userfile import load_user_file

__all__ = [
    "Dataset",
    "DatasetInfo",
    "EntropyEstimate",
    "SplitLabels",
    "bits_per_dim",
    "dequantize",
    "list_datasets",
    "load",
    "load_user_file",
    "parse_idx",
    "read_cifar_batch",
    "read_idx",
    "true_entropy",
]
