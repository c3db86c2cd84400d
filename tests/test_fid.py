"""FID proper through pytorch-fid (an option: the library and the Inception weights come from the user)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from localfm import fid


def pytorch_fid_or_skip():
    try:
        from pytorch_fid import inception
    except (ImportError, RuntimeError, OSError) as err:  # not installed, or a torchvision built for another torch
        pytest.skip(f"pytorch-fid is not usable here ({type(err).__name__}: {err})")
    return inception


def test_without_pytorch_fid_the_error_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install --no-deps pytorch-fid torchvision=="):
        fid.inception_network(tmp_path / "weights.pth")
    with pytest.raises(ImportError, match="classifier Frechet distance"):
        fid.fid(np.zeros((2, 1, 8, 8)), np.zeros((2, 1, 8, 8)), tmp_path / "weights.pth")


def test_fid_through_pytorch_fid_with_a_weights_file(tmp_path):
    """pytorch-fid's own FID network with seeded random weights (the real ones cannot be had here):
    the file is read as tensors, FID of a set with itself is 0, and grey images are accepted."""
    inception = pytorch_fid_or_skip()
    torch.manual_seed(0)
    net = inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = inception.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = inception.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = inception.FIDInceptionA(288, pool_features=64)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        setattr(net, name, inception.FIDInceptionC(768, channels_7x7=c7))
    net.Mixed_7b, net.Mixed_7c = inception.FIDInceptionE_1(1280), inception.FIDInceptionE_2(2048)
    weights = tmp_path / "weights.pth"
    torch.save(net.state_dict(), weights)
    g = np.random.default_rng(0)
    a, b = g.uniform(-1, 1, (8, 1, 28, 28)), g.uniform(-1, 1, (8, 1, 28, 28))
    model = fid.inception_network(weights)
    assert fid.inception_features(model, a).shape == (8, 2048)
    assert fid.fid(a, a, model) == pytest.approx(0.0, abs=1e-6)
    assert fid.fid(a, b * 0.2, weights) > 0
    torch.save({"not": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="does not hold the FID Inception-v3 weights"):
        fid.inception_network(tmp_path / "wrong.pth")
    with pytest.raises(FileNotFoundError, match="no Inception weights file"):
        fid.inception_network(tmp_path / "absent.pth")
