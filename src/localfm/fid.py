"""FID proper (Heusel et al., 2017) through pytorch-fid, with Inception weights the user has on disk.

localfm scores image samples with its own classifier Frechet distance (:mod:`localfm.classifier`),
which needs nothing from outside. FID proper needs two things localfm neither bundles nor downloads:

* ``pytorch-fid`` and a ``torchvision`` built for the installed torch (install them with
  ``pip install --no-deps pytorch-fid torchvision==<the release matching your torch>``, so that no
  resolver replaces torch);
* the Inception-v3 weights of TensorFlow's FID as pytorch-fid publishes them
  (``pt_inception-2015-12-05-6726825d.pth``), given as a file.

The weights are read with ``torch.load(weights_only=True)`` (tensors only: nothing in the file runs)
and handed to pytorch-fid's own network builder in place of its download. Images in [-1, 1] are
mapped to [0, 1], grey images repeated to three channels, and pytorch-fid's network resizes them to
299 x 299 and returns the 2048 pool features, whose Gaussians ``calculate_frechet_distance`` compares.
``localfm eval RUN --fid-weights FILE`` adds ``fid`` to ``metrics.json`` for image runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["inception_network", "inception_features", "fid"]


def _pytorch_fid():
    try:
        from pytorch_fid import fid_score, inception
    except Exception as err:  # ImportError, or a torchvision that cannot load its compiled operators
        raise ImportError(
            f"FID needs pytorch-fid with a torchvision that loads under this torch ({type(err).__name__}: {err}); "
            "install both with `pip install --no-deps pytorch-fid torchvision==<the release for your torch>`, "
            "or use the classifier Frechet distance that `localfm eval` reports without them"
        ) from None
    return inception, fid_score


def inception_network(weights: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """pytorch-fid's FID Inception-v3 (pool features, 2048), with the weights in the file ``weights``."""
    inception, _ = _pytorch_fid()
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"no Inception weights file at {path}: FID needs pytorch-fid's pt_inception-2015-12-05-6726825d.pth"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a file of tensors that torch can read safely: {err}") from None
    download = inception.load_state_dict_from_url
    inception.load_state_dict_from_url = lambda *args, **kwargs: state  # the local file, not a download
    try:
        net = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    except RuntimeError as err:  # load_state_dict: missing, unexpected or misshapen tensors
        raise ValueError(f"{path} does not hold the FID Inception-v3 weights: {err}") from None
    finally:
        inception.load_state_dict_from_url = download
    return net.eval().to(device)


@torch.no_grad()
def inception_features(net: nn.Module, images, batch_size: int = 100) -> np.ndarray:
    """Pool features (N, 2048) of images (N, C, H, W) in [-1, 1] (C = 1 or 3), as float64."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"FID takes images of shape (N, 1 or 3, H, W), got {tuple(x.shape)}")
    device = next(net.parameters()).device
    out = []
    for i in range(0, len(x), batch_size):
        b = ((x[i : i + batch_size].float().clamp(-1, 1) + 1) / 2).to(device)
        b = b.expand(-1, 3, -1, -1) if b.shape[1] == 1 else b
        out.append(net(b)[0].flatten(1).double().cpu())
    return torch.cat(out).numpy()


def fid(samples, reference, network: nn.Module | str | Path, *, batch_size: int = 100, device: str = "cpu") -> float:
    """FID between image sets in [-1, 1] (N, C, H, W): ``network`` is :func:`inception_network` or its weights file."""
    _, fid_score = _pytorch_fid()
    net = network if isinstance(network, nn.Module) else inception_network(network, device)
    f1, f2 = inception_features(net, samples, batch_size), inception_features(net, reference, batch_size)
    if min(len(f1), len(f2)) < 2:
        raise ValueError("FID needs at least 2 images in each set")
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in (f1, f2)]
    return float(fid_score.calculate_frechet_distance(*stats[0], *stats[1]))
