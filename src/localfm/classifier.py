"""A small image classifier of our own, and the Frechet distance in its features.

There are no Inception weights here, so image samples are scored by the **classifier Frechet
distance**: the Frechet distance between Gaussians fitted to the penultimate-layer features of a
small CNN that localfm trains itself (on Fashion-MNIST, or any labelled image set),

    d^2 = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1^{1/2} S_2 S_1^{1/2})^{1/2}).

It is the formula of FID in other features, so its values are not comparable with published FID
numbers; it is never called FID here. FID proper needs the Inception-v3 weights of Heusel et al.
and pytorch-fid, which localfm neither bundles nor downloads: with both, see :mod:`localfm.fid`
(``localfm eval RUN --fid-weights FILE``).

Training is deterministic: the seed fixes the initial weights and the order of the minibatches,
so two trainings with the same seed, data and thread count give identical weights. A trained
classifier is a folder with ``classifier.safetensors`` and ``classifier.json`` (config, test
accuracy, checksums), written atomically; :func:`classifier_for` caches one per dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import CheckpointError, read_json, read_tensors, write_json, write_tensors
from .config import from_dict, to_dict

__all__ = [
    "ClassifierConfig",
    "Classifier",
    "train_classifier",
    "save_classifier",
    "load_classifier",
    "classifier_for",
    "frechet_distance",
    "gaussian_frechet_distance",
]

log = logging.getLogger(__name__)
FORMAT = "localfm-classifier"


@dataclass(frozen=True)
class ClassifierConfig:
    """The CNN and its training: two 3x3 conv layers of ``channels`` (each followed by 2x2
    max-pooling), a ``features``-wide hidden layer (the features of the Frechet distance), then
    the class scores; Adam with ``lr`` for ``epochs`` passes in minibatches of ``batch_size``."""

    channels: tuple[int, ...] = (32, 64)
    features: int = 128
    epochs: int = 3
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.channels) != 2 or any(c < 1 for c in self.channels):
            raise ValueError(f"channels must be two integers >= 1, got {self.channels!r}")
        for name in ("features", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be > 0, got {self.lr}")


class Classifier(nn.Module):
    """``logits = W_2 relu(W_1 flatten(pool(relu(conv(pool(relu(conv(x))))))))`` for (B, C, H, W) input.

    :meth:`features` returns the hidden layer ``relu(W_1 ...)``, shape (B, ``config.features``).
    ``info`` holds what training recorded (dataset, test accuracy, seconds).
    """

    def __init__(self, shape: tuple[int, int, int], n_classes: int, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        if len(shape) != 3 or min(shape) < 1 or min(shape[1:]) < 4:
            raise ValueError(f"the classifier needs images (C, H, W) with H, W >= 4, got shape {shape!r}")
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.shape, self.n_classes, self.config = tuple(shape), n_classes, config
        c1, c2 = config.channels
        self.conv1 = nn.Conv2d(shape[0], c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.hidden = nn.Linear(c2 * (shape[1] // 4) * (shape[2] // 4), config.features)
        self.out = nn.Linear(config.features, n_classes)
        self.info: dict[str, Any] = {}

    def features(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.hidden(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.features(x))

    @torch.no_grad()
    def embed(self, x, batch_size: int = 1000) -> np.ndarray:
        """Features of images ``x`` (N, C, H, W) in [-1, 1], as float64 (N, features)."""
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
        if x.dim() != 4 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"expected images of shape (N, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        self.eval()
        p = next(self.parameters())
        out = [
            self.features(x[i : i + batch_size].to(p.device, p.dtype)).double().cpu()
            for i in range(0, len(x), batch_size)
        ]
        return torch.cat(out).numpy()

    @torch.no_grad()
    def accuracy(self, x, y, batch_size: int = 1000) -> float:
        self.eval()
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        right = sum(
            int((self(x[i : i + batch_size].float()).argmax(1) == y[i : i + batch_size]).sum())
            for i in range(0, len(x), batch_size)
        )
        return right / len(x)


def train_classifier(
    x,
    y,
    config: ClassifierConfig = ClassifierConfig(),
    *,
    x_test=None,
    y_test=None,
    n_classes: int | None = None,
) -> Classifier:
    """Train the CNN on images ``x`` (N, C, H, W) with integer labels ``y`` (N,), on the CPU.

    With ``x_test, y_test`` the test accuracy is measured and kept in ``classifier.info``.
    Deterministic: the same data, config (seed included) and thread count give the same weights.
    """
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    y = torch.as_tensor(np.asarray(y, dtype=np.int64))
    if x.dim() != 4 or y.shape != (len(x),) or len(x) < 2:
        raise ValueError(
            f"x must be images (N, C, H, W) and y their N labels, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    n_classes = n_classes or int(y.max()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = Classifier(tuple(x.shape[1:]), n_classes, config)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    g = torch.Generator().manual_seed(config.seed)
    steps = config.epochs * math.ceil(len(x) / config.batch_size)
    t0, step = time.perf_counter(), 0
    net.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), config.batch_size):
            idx = order[i : i + config.batch_size]
            for group in opt.param_groups:  # cosine decay: a steadier end point than a constant rate
                group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    net.eval()
    net.info = {"train_points": len(x), "train_seconds": time.perf_counter() - t0, "final_loss": float(loss.detach())}
    if x_test is not None and y_test is not None:
        net.info["test_accuracy"] = net.accuracy(np.asarray(x_test, dtype=np.float32), np.asarray(y_test))
        net.info["test_points"] = len(x_test)
    return net


def save_classifier(classifier: Classifier, path: str | Path) -> Path:
    """Write ``classifier.safetensors`` and ``classifier.json`` into the folder ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        sha = write_tensors(tmp / "classifier.safetensors", classifier.state_dict())
        meta = {
            "format": FORMAT,
            "shape": list(classifier.shape),
            "n_classes": classifier.n_classes,
            "config": to_dict(classifier.config),
            "info": classifier.info,
            "tensors_sha256": sha,
        }
        write_json(tmp / "classifier.json", meta)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_classifier(path: str | Path) -> Classifier:
    """Rebuild a classifier saved by :func:`save_classifier` (checksums verified, nothing unpickled)."""
    path = Path(path)
    meta = read_json(path / "classifier.json", require_checksum=True)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a localfm classifier (format {meta.get('format')!r})")
    tensors = read_tensors(path / "classifier.safetensors", meta.get("tensors_sha256"))
    try:
        net = Classifier(tuple(meta["shape"]), int(meta["n_classes"]), from_dict(ClassifierConfig, meta["config"]))
        net.load_state_dict(tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: cannot rebuild the classifier: {err}") from None
    net.info = dict(meta.get("info") or {})
    return net.eval()


def _config_tag(config: ClassifierConfig) -> str:
    return hashlib.sha256(json.dumps(to_dict(config), sort_keys=True).encode()).hexdigest()[:10]


def classifier_for(dataset, config: ClassifierConfig = ClassifierConfig(), *, cache_dir=None) -> Classifier:
    """The classifier of a labelled image dataset (a :class:`~localfm.datasets.Dataset`).

    Loaded from ``<data home>/classifiers/<name>-<config tag>`` when there, else trained on the
    training split (test accuracy on the test split) and saved there.
    """
    from .datasets._base import data_home

    if dataset.kind != "image" or dataset.labels is None:
        raise ValueError(f"classifier_for needs a labelled image dataset, got {dataset.name!r} ({dataset.kind})")
    folder = data_home(cache_dir) / "classifiers" / f"{dataset.name}-{_config_tag(config)}"
    if (folder / "classifier.json").is_file():
        try:
            return load_classifier(folder)
        except CheckpointError as err:
            log.warning("retraining the classifier: %s", err)
    log.info("training the %s classifier (cached in %s)", dataset.name, folder)
    net = train_classifier(
        dataset.train,
        dataset.labels.train,
        config,
        x_test=dataset.test,
        y_test=dataset.labels.test,
        n_classes=int(max(dataset.labels.train.max(), dataset.labels.test.max())) + 1,
    )
    net.info["dataset"] = dataset.name
    save_classifier(net, folder)
    return net


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def gaussian_frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``f1`` (N, k) and ``f2`` (M, k).

    ``tr((S_1 S_2)^{1/2})`` is computed as the trace of the square root of the symmetric
    ``S_1^{1/2} S_2 S_1^{1/2}`` (same eigenvalues), which stays real and stable.
    """
    f1, f2 = np.asarray(f1, dtype=np.float64), np.asarray(f2, dtype=np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f"need two feature sets (N, k), (M, k) with N, M >= 2, got {f1.shape} and {f2.shape}")
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    r1 = _sqrtm_psd(s1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float(max(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross, 0.0))


def frechet_distance(samples, reference, classifier: Classifier, *, batch_size: int = 1000) -> float:
    """Classifier Frechet distance between image sets (N, C, H, W) in [-1, 1] (not FID).

    ``samples`` are clipped to [-1, 1] (the range the classifier saw) before their features are taken.
    """
    s = torch.as_tensor(np.asarray(samples) if not isinstance(samples, Tensor) else samples).float().clamp(-1, 1)
    return gaussian_frechet_distance(
        classifier.embed(s, batch_size), classifier.embed(torch.as_tensor(np.asarray(reference)), batch_size)
    )
