"""A UNet velocity network ``v_theta(x, t)`` for images, ``x`` of shape (B, C, H, W).

The layout of DDPM's UNet (Ho et al. 2020) as flow-matching image models use it: a sinusoidal
embedding of ``t`` through a two-layer MLP; at each resolution ``blocks_per_level`` residual blocks
(GroupNorm, SiLU, 3x3 convolutions, a time-dependent scale and shift after the second
normalisation, dropout), self-attention at the resolutions listed in ``attention_resolutions``; a
middle of residual block, attention, residual block; and a decoder that mirrors the encoder with
skip connections. The last layer of
every residual branch and the output convolution start at zero, so a fresh network is the zero
field and each residual block starts as the identity.

Build it from a config (``NetConfig(kind="unet", ...)``, see :func:`localfm.nets.build_net`)::

    net = UNet((1, 28, 28), NetConfig(kind="unet", channels=32, channel_mult=(1, 2, 2)))
    v = net(x, t)      # x: (B, 1, 28, 28), t: (B,) or a 0-d tensor -> v: (B, 1, 28, 28)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from .nets import NetConfig

__all__ = ["UNet", "time_embedding"]


def time_embedding(t: Tensor, dim: int, *, scale: float = 1000.0, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features ``[cos(s t w_k), sin(s t w_k)]``, ``w_k = max_period^(-k / (dim/2))``.

    ``t``: shape (B,), times in [0, 1]; ``scale`` spreads them over the periods as for integer
    diffusion steps. Returns (B, dim).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    arg = scale * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb.to(t.dtype)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    # The largest group count dividing the channels: 32 groups where possible, as in DDPM.
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """``x + conv(drop(silu(norm(h) (1 + a) + b)))``, ``h = conv(silu(norm(x)))``, ``(a, b) = W emb``.

    Time enters as a scale and shift after the normalisation (as in improved DDPM): a shift added
    before GroupNorm would be removed by it whenever a group holds a single channel.
    """

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2, self.drop = _norm(c_out, groups), nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual, output projection at zero."""

    def __init__(self, channels: int, heads: int, groups: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        q, k, v = (t.transpose(-1, -2).contiguous() for t in (q, k, v))  # (B, heads, HW, d)
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Level(nn.Module):
    """Residual blocks (each optionally followed by attention) at one resolution."""

    def __init__(self, blocks: list[ResBlock], attention: list[nn.Module]) -> None:
        super().__init__()
        self.blocks, self.attention = nn.ModuleList(blocks), nn.ModuleList(attention)


class UNet(nn.Module):
    """UNet velocity field for images of shape ``shape = (C, H, W)``.

    Args:
        shape: the event shape (C, H, W).
        config: a :class:`~localfm.nets.NetConfig` with ``kind="unet"``: ``channels`` (base
            width), ``channel_mult`` (width multiplier per resolution level; the image is halved
            between levels), ``blocks_per_level``, ``attention_resolutions`` (side lengths H at
            which blocks attend), ``heads``, ``dropout``, ``norm_groups``.
    """

    def __init__(self, shape: tuple[int, int, int], config: NetConfig) -> None:
        super().__init__()
        if len(shape) != 3 or any(not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(f"UNet needs an image shape (C, H, W), got {shape!r}")
        self.shape, self.config = tuple(shape), config
        c_img, H, _ = shape
        ch, groups, heads, drop = config.channels, config.norm_groups, config.heads, config.dropout
        self.emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, self.emb_dim), nn.SiLU(), nn.Linear(self.emb_dim, self.emb_dim))
        self.conv_in = nn.Conv2d(c_img, ch, 3, padding=1)

        def attend(c: int, res: int) -> nn.Module:
            if res not in config.attention_resolutions:
                return nn.Identity()
            if c % heads:
                raise ValueError(f"net.heads={heads} must divide the {c} channels at resolution {res}")
            return Attention(c, heads, groups)

        # Encoder: remember the channels of every skip connection.
        skips, c, res, level_res = [ch], ch, H, []
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for i, mult in enumerate(config.channel_mult):
            blocks, attn = [], []
            level_res.append(res)
            for _ in range(config.blocks_per_level):
                blocks.append(ResBlock(c, ch * mult, self.emb_dim, drop, groups))
                c = ch * mult
                attn.append(attend(c, res))
                skips.append(c)
            self.down.append(Level(blocks, attn))
            last = i == len(config.channel_mult) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(c, c, 3, stride=2, padding=1))
            if not last:
                skips.append(c)
                res = (res + 1) // 2
        self.mid1 = ResBlock(c, c, self.emb_dim, drop, groups)
        self.mid_attn = Attention(c, heads if c % heads == 0 else 1, groups)
        self.mid2 = ResBlock(c, c, self.emb_dim, drop, groups)
        # Decoder: one block more per level than the encoder, each taking one skip.
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, mult in reversed(list(enumerate(config.channel_mult))):
            blocks, attn, res = [], [], level_res[i]
            for _ in range(config.blocks_per_level + 1):
                blocks.append(ResBlock(c + skips.pop(), ch * mult, self.emb_dim, drop, groups))
                c = ch * mult
                attn.append(attend(c, res))
            self.up.append(Level(blocks, attn))
            self.upsample.append(nn.Identity() if i == 0 else nn.Conv2d(c, c, 3, padding=1))
        self.norm_out = _norm(c, groups)
        self.conv_out = _zero(nn.Conv2d(c, c_img, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"UNet built for images of shape {self.shape} got x of shape {tuple(x.shape)}")
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_mlp(time_embedding(t, self.config.channels))
        h = self.conv_in(x)
        hs = [h]
        for level, down in zip(self.down, self.downsample, strict=True):
            for block, attn in zip(level.blocks, level.attention, strict=True):
                h = attn(block(h, emb))
                hs.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for level, up in zip(self.up, self.upsample, strict=True):
            for block, attn in zip(level.blocks, level.attention, strict=True):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), emb))
            if not isinstance(up, nn.Identity):
                # Nearest-neighbour upsampling to the skip's size (odd sizes such as 7 -> 4 -> 7).
                h = up(F.interpolate(h, size=hs[-1].shape[-2:], mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))
