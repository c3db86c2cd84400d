"""Velocity networks ``v_theta(x, t) -> dx/dt``: an MLP for flat data, a UNet for images.

Any ``nn.Module`` called as ``net(x, t)`` with ``x`` of shape (B, ...) and ``t`` of shape (B,)
(or a 0-d tensor, broadcast over the batch), returning a tensor shaped like ``x``, can serve as
a block's network. Conditional networks also take ``context`` of shape (B, c).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["MLP", "NetConfig", "build_net", "count_parameters"]

_KINDS = ("mlp", "unet")
_ACTIVATIONS = ("relu", "elu", "silu", "softplus", "tanh", "gelu")


@dataclass(frozen=True)
class NetConfig:
    """Settings of the velocity network: ``kind`` is ``"mlp"`` (flat data) or ``"unet"`` (images).

    MLP: ``width``, ``depth``, ``activation``; ``time_embedding`` is ``"concat"`` (t appended to
    the input, the authors' choice) or ``"fourier"`` (``fourier_features`` sinusoids of t);
    ``beta`` is softplus's sharpness; ``context_dim`` adds a conditioning input.
    ``x_fourier`` > 0 adds that many random Fourier features of x, ``sin(Bx)`` and ``cos(Bx)`` with
    ``B ~ N(0, x_fourier_scale^2)`` fixed at initialisation (Tancik et al., 2020): plain MLPs learn
    fine spatial detail slowly (the tree's twigs), these features let them resolve it in minutes.

    UNet (:class:`localfm.unet.UNet`): ``channels`` (base width), ``channel_mult`` (one width
    multiplier per resolution level, halving the image between levels), ``blocks_per_level``
    residual blocks per level, self-attention at the side lengths in ``attention_resolutions``,
    ``heads`` attention heads, ``dropout``, GroupNorm with up to ``norm_groups`` groups.
    """

    kind: str = "mlp"
    width: int = 256
    depth: int = 3
    activation: str = "softplus"
    beta: float = 20.0
    time_embedding: str = "concat"
    fourier_features: int = 16
    context_dim: int = 0
    x_fourier: int = 0
    x_fourier_scale: float = 10.0
    channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    blocks_per_level: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    heads: int = 4
    dropout: float = 0.0
    norm_groups: int = 32

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(
                f"net.kind must be one of {_KINDS} (other networks are passed as modules), got {self.kind!r}"
            )
        if self.width < 1 or self.depth < 1:
            raise ValueError(f"net.width and net.depth must be >= 1, got {self.width}, {self.depth}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"net.activation must be one of {_ACTIVATIONS}, got {self.activation!r}")
        if self.time_embedding not in ("concat", "fourier"):
            raise ValueError(f"net.time_embedding must be 'concat' or 'fourier', got {self.time_embedding!r}")
        if not (0 < self.beta < math.inf):
            raise ValueError(f"net.beta must be > 0, got {self.beta}")
        if self.fourier_features < 1 or self.context_dim < 0:
            raise ValueError("net.fourier_features must be >= 1 and net.context_dim >= 0")
        if self.x_fourier < 0 or not (0 < self.x_fourier_scale < math.inf):
            raise ValueError(
                f"net.x_fourier must be >= 0 and net.x_fourier_scale > 0, got {self.x_fourier}, {self.x_fourier_scale}"
            )
        for name in ("channels", "blocks_per_level", "heads", "norm_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"net.{name} must be >= 1, got {getattr(self, name)}")
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"net.channel_mult must be a non-empty list of integers >= 1, got {self.channel_mult!r}")
        if any(r < 1 for r in self.attention_resolutions):
            raise ValueError(f"net.attention_resolutions must hold side lengths >= 1, got {self.attention_resolutions}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"net.dropout must be in [0, 1), got {self.dropout}")
        if self.kind == "unet" and self.context_dim:
            raise ValueError("net.context_dim must be 0 for kind 'unet' (the UNet takes no conditioning input)")


def _activation(name: str, beta: float) -> nn.Module:
    if name == "softplus":
        return nn.Softplus(beta=beta)
    return {"relu": nn.ReLU, "elu": nn.ELU, "silu": nn.SiLU, "tanh": nn.Tanh, "gelu": nn.GELU}[name]()


class MLP(nn.Module):
    """``v(x, t) = W_L s(... s(W_1 [x, emb(t), context]))``: ``depth`` hidden layers of ``width``.

    Args:
        dim: data dimension d.
        config: :class:`NetConfig`.
    """

    def __init__(self, dim: int, config: NetConfig = NetConfig()) -> None:
        super().__init__()
        self.dim, self.config = dim, config
        if config.time_embedding == "fourier":
            k = config.fourier_features
            # Fixed log-spaced frequencies: deterministic, nothing to learn or to seed.
            self.register_buffer("freqs", math.pi * torch.logspace(0, math.log10(100), k // 2 + k % 2))
            t_dim = 2 * self.freqs.numel()
        else:
            self.freqs = None
            t_dim = 1
        if config.x_fourier:
            # Drawn from the global generator, which fit() seeds per block: reproducible, and saved
            # with the weights as a buffer.
            self.register_buffer("x_freqs", config.x_fourier_scale * torch.randn(dim, config.x_fourier))
        else:
            self.x_freqs = None
        layers: list[nn.Module] = []
        fan_in = dim + 2 * config.x_fourier + t_dim + config.context_dim
        for _ in range(config.depth):
            layers += [nn.Linear(fan_in, config.width), _activation(config.activation, config.beta)]
            fan_in = config.width
        layers.append(nn.Linear(fan_in, dim))
        self.layers = nn.Sequential(*layers)
        if config.context_dim:
            # The "no context" input of classifier-free guidance, learned when train.context_dropout > 0.
            self.null_context = nn.Parameter(torch.zeros(config.context_dim))

    @property
    def context_dim(self) -> int:
        """Size c of the conditioning input (0: unconditional)."""
        return self.config.context_dim

    def embed_time(self, t: Tensor, batch: int, like: Tensor) -> Tensor:
        t = t.to(like.dtype).reshape(-1, 1).expand(batch, 1)
        if self.freqs is None:
            return t
        a = t * self.freqs
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        parts = [x, self.embed_time(t, x.shape[0], x)]
        if self.x_freqs is not None:
            a = x @ self.x_freqs.to(x.dtype)
            parts += [torch.sin(a), torch.cos(a)]
        if self.config.context_dim:
            if context is None:
                raise ValueError("this network was built with context_dim > 0: pass context=")
            parts.append(context.to(x.dtype).expand(x.shape[0], -1))
        return self.layers(torch.cat(parts, dim=1))


def build_net(dim: int | tuple[int, ...], config: NetConfig) -> nn.Module:
    """Build the velocity network described by ``config``.

    ``dim`` is the dimension d of flat data (an int) or the event shape of images, (C, H, W);
    ``fit`` and ``load`` pass exactly that. ``kind: mlp`` needs flat data, ``kind: unet`` images.
    """
    if config.kind == "unet":
        if isinstance(dim, int) or len(dim) != 3:
            raise ValueError(f"net.kind 'unet' needs images of shape (C, H, W), got data of shape {dim!r}")
        from .unet import UNet

        return UNet(tuple(int(s) for s in dim), config)
    if not isinstance(dim, int):
        if len(dim) != 1:
            raise ValueError(
                f"net.kind 'mlp' needs flat data (N, d), got points of shape {tuple(dim)}: use net.kind: unet"
            )
        dim = int(dim[0])
    return MLP(dim, config)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
