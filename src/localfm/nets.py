"""Velocity networks ``v_theta(x, t) -> dx/dt``.

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

_ACTIVATIONS = ("relu", "elu", "silu", "softplus", "tanh", "gelu")


@dataclass(frozen=True)
class NetConfig:
    """Settings of the default MLP velocity network.

    ``time_embedding`` is ``"concat"`` (t appended to the input, the authors' choice) or
    ``"fourier"`` (``fourier_features`` sinusoids of t). ``beta`` is softplus's sharpness.
    """

    kind: str = "mlp"
    width: int = 256
    depth: int = 3
    activation: str = "softplus"
    beta: float = 20.0
    time_embedding: str = "concat"
    fourier_features: int = 16
    context_dim: int = 0

    def __post_init__(self) -> None:
        if self.kind != "mlp":
            raise ValueError(f"net.kind must be 'mlp' (other networks are passed as modules), got {self.kind!r}")
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
        layers: list[nn.Module] = []
        fan_in = dim + t_dim + config.context_dim
        for _ in range(config.depth):
            layers += [nn.Linear(fan_in, config.width), _activation(config.activation, config.beta)]
            fan_in = config.width
        layers.append(nn.Linear(fan_in, dim))
        self.layers = nn.Sequential(*layers)

    def embed_time(self, t: Tensor, batch: int, like: Tensor) -> Tensor:
        t = t.to(like.dtype).reshape(-1, 1).expand(batch, 1)
        if self.freqs is None:
            return t
        a = t * self.freqs
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        parts = [x, self.embed_time(t, x.shape[0], x)]
        if self.config.context_dim:
            if context is None:
                raise ValueError("this network was built with context_dim > 0: pass context=")
            parts.append(context.to(x.dtype))
        return self.layers(torch.cat(parts, dim=1))


def build_net(dim: int, config: NetConfig) -> nn.Module:
    """Build the velocity network described by ``config`` for data of dimension ``dim``."""
    return MLP(dim, config)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
