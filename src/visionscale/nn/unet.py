"""Denoising U-Net of DDAD (a guided-diffusion ``UNetModel`` variant).

Paper: Mousakhan, Brox, Tayyub, "Anomaly Detection with Conditioned Denoising Diffusion
Models", arXiv:2305.15956, 2023. Official code: https://github.com/arimousa/DDAD
(``unet.py``, itself adapted from https://github.com/openai/guided-diffusion ``unet.py``;
``main.py`` builds ``UNetModel(256, 64, dropout=0.0, n_heads=4, in_channels=3)``).

Architecture as in the official ``unet.py`` (checked against its source):

* sinusoidal timestep embedding of width ``base`` (sin first, then cos), then
  Linear(base, 4*base), SiLU, Linear(4*base, 4*base);
* residual blocks GroupNorm(32) -> SiLU -> conv3x3, plus Linear(emb) added to the
  features (no scale-shift norm), GroupNorm -> SiLU -> Dropout -> zero-initialised
  conv3x3; 1x1 conv skip when channels change;
* ``num_res_blocks = 2`` per level, channel multipliers ``(1, 1, 2, 2, 4, 4)`` for 256 px;
* down/up-sampling by residual blocks (BigGAN style, ``biggan_updown=True``): average
  pooling / nearest-neighbour upsampling inside the block, no resampling conv;
* self-attention after every residual block of a level whose downsample factor is in
  ``attention_ds`` (official: resolutions "32,16,8" at 256 px -> factors 8, 16, 32), and
  always in the middle block; 4 heads, legacy QKV channel order, zero-initialised output
  projection.

Parameter names follow the official module tree, so an official checkpoint (with the
``module.`` prefix of ``DataParallel`` stripped) loads with ``load_state_dict``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AttentionImpl = Literal["math", "sdpa"]


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the denoising U-Net.

    Attributes:
        in_channels: Image channels in.
        out_channels: Channels of the predicted noise.
        base_channels: Width of the first level (official DDAD: 64; DDAD-S: 32).
        channel_mults: Width multiplier per level; ``len - 1`` halvings of H and W.
        num_res_blocks: Residual blocks per level on the way down (one more on the way up).
        attention_ds: Downsample factors (1 = input resolution, 2 = half...) of the
            levels that get self-attention. The official code takes *resolutions*
            ``"32,16,8"`` relative to ``img_size`` and converts them with
            ``img_size // res``; :meth:`from_resolutions` does the same.
        num_heads: Attention heads (used when ``num_head_channels == -1``).
        num_head_channels: Channels per head; overrides ``num_heads`` when not -1.
        dropout: Dropout in residual blocks (DDAD: 0.0, DDAD-S: 0.3).
        norm_groups: GroupNorm groups (official: 32); smaller for tiny variants.
        resblock_updown: Resample with residual blocks (official ``biggan_updown=True``);
            otherwise with strided conv / nearest+conv (``conv_resample``).
        conv_resample: Only used when ``resblock_updown`` is False.
        attention: ``"math"`` materialises the (tokens x tokens) weights like the
            reference; ``"sdpa"`` uses ``F.scaled_dot_product_attention``.
    """

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 64
    channel_mults: tuple[float, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attention_ds: tuple[int, ...] = (8, 16, 32)
    num_heads: int = 4
    num_head_channels: int = -1
    dropout: float = 0.0
    norm_groups: int = 32
    resblock_updown: bool = True
    conv_resample: bool = True
    attention: AttentionImpl = "math"

    @staticmethod
    def from_resolutions(image_size: int, resolutions: tuple[int, ...] = (32, 16, 8)) -> tuple[int, ...]:
        """Official conversion of attention resolutions to downsample factors."""
        return tuple(sorted(image_size // r for r in resolutions))

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this (one halving per level transition)."""
        return 2 ** (len(self.channel_mults) - 1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (guided-diffusion: stable under fp16)."""

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        if xf.device.type == "meta":
            # PyTorch's meta kernel for group_norm runs its Python reference (~5 ms a
            # call, 100 calls per U-Net pass); the output is shaped like the input.
            return torch.empty_like(xf).type(x.dtype)
        return super().forward(xf).type(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    # Output layers start at zero so every block starts as the identity (guided-diffusion).
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class SinusoidalEmbedding(nn.Module):
    """Timestep -> (B, dim) sinusoidal features; official order is [sin, cos]."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"timestep embedding width must be even, got {dim}")
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / half))
        args = t.float()[:, None] * freqs[None]  # (B, half)
        return torch.cat([args.sin(), args.cos()], dim=-1)  # (B, dim), float32


class Downsample(nn.Module):
    """Halve H and W: strided conv or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.downsample = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            if out_channels != channels:
                raise ValueError("pooling cannot change the channel count")
            self.downsample = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.downsample(x)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour interpolation, optionally followed by a conv."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class ResBlock(nn.Module):
    """Residual block with an additive timestep embedding; optionally resamples."""

    def __init__(self, in_ch: int, emb_dim: int, dropout: float, groups: int, out_ch: int | None = None,
                 up: bool = False, down: bool = False):
        super().__init__()
        out_ch = out_ch or in_ch
        self.in_layers = nn.Sequential(GroupNorm32(groups, in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(in_ch, False), Upsample(in_ch, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(in_ch, False), Downsample(in_ch, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.embed_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_ch), nn.SiLU(), nn.Dropout(dropout), _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        )
        self.skip_connection = nn.Identity() if out_ch == in_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.updown:
            # Resample between the activation and the conv, and on the skip path too.
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)  # (B, out_ch, H, W)
        h = h + self.embed_layers(emb).type(h.dtype)[:, :, None, None]
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class QKVAttention(nn.Module):
    """Multi-head attention over (B, 3*C, T) packed QKV, legacy (per-head) channel order."""

    def __init__(self, num_heads: int, impl: AttentionImpl = "math"):
        super().__init__()
        if impl not in ("math", "sdpa"):
            raise ValueError(f"attention must be 'math' or 'sdpa', got {impl!r}")
        self.num_heads = num_heads
        self.impl = impl

    def forward(self, qkv: Tensor) -> Tensor:
        b, width, length = qkv.shape
        ch = width // (3 * self.num_heads)
        # Legacy layout: heads outermost, then q/k/v, each ch channels.
        q, k, v = qkv.reshape(b * self.num_heads, 3 * ch, length).split(ch, dim=1)  # 3 x (B*nh, ch, T)
        if self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out.transpose(1, 2).reshape(b, -1, length)  # (B, C, T)
        scale = 1.0 / math.sqrt(math.sqrt(ch))  # split over q and k: more stable in fp16
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)  # (B*nh, T, T): grows as (H*W)^2
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = torch.einsum("bts,bcs->bct", weight, v)  # (B*nh, ch, T)
        return out.reshape(b, -1, length)


class AttentionBlock(nn.Module):
    """Residual self-attention over all spatial positions of a feature map."""

    def __init__(self, channels: int, groups: int, num_heads: int = 1, num_head_channels: int = -1,
                 impl: AttentionImpl = "math"):
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels not divisible by num_head_channels={num_head_channels}")
            num_heads = channels // num_head_channels
        if channels % num_heads:
            raise ValueError(f"{channels} channels not divisible by {num_heads} heads")
        self.norm = GroupNorm32(groups, channels)
        self.to_qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.attention = QKVAttention(num_heads, impl)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)  # (B, C, T) with T = H*W tokens
        h = self.proj_out(self.attention(self.to_qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


class EmbedSequential(nn.Sequential):
    """Sequential that passes the timestep embedding to the residual blocks."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    """Noise-prediction U-Net: ``forward(x, t) -> eps`` with ``eps.shape == x.shape``."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        cfg = self.config = config or UNetConfig()
        base, groups, mults = cfg.base_channels, cfg.norm_groups, cfg.channel_mults
        emb_dim = 4 * base
        attn_kw = dict(groups=groups, num_heads=cfg.num_heads, num_head_channels=cfg.num_head_channels,
                       impl=cfg.attention)
        res_kw = dict(emb_dim=emb_dim, dropout=cfg.dropout, groups=groups)

        self.time_embedding = nn.Sequential(
            SinusoidalEmbedding(base), nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        ch = int(mults[0] * base)
        self.down = nn.ModuleList([EmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_chs = [ch]  # channels of every down output, consumed in reverse by the up path
        ds = 1
        for level, mult in enumerate(mults):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, out_ch=int(base * mult), **res_kw)]
                ch = int(base * mult)
                if ds in cfg.attention_ds:
                    layers.append(AttentionBlock(ch, **attn_kw))
                self.down.append(EmbedSequential(*layers))
                skip_chs.append(ch)
            if level != len(mults) - 1:
                resample = (ResBlock(ch, down=True, **res_kw) if cfg.resblock_updown
                            else Downsample(ch, cfg.conv_resample))
                self.down.append(EmbedSequential(resample))
                skip_chs.append(ch)
                ds *= 2

        self.middle = EmbedSequential(ResBlock(ch, **res_kw), AttentionBlock(ch, **attn_kw), ResBlock(ch, **res_kw))

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for j in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chs.pop(), out_ch=int(base * mult), **res_kw)]
                ch = int(base * mult)
                if ds in cfg.attention_ds:
                    layers.append(AttentionBlock(ch, **attn_kw))
                if level and j == cfg.num_res_blocks:
                    layers.append(ResBlock(ch, up=True, **res_kw) if cfg.resblock_updown
                                  else Upsample(ch, cfg.conv_resample))
                    ds //= 2
                self.up.append(EmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(groups, ch), nn.SiLU(),
                                 _zero(nn.Conv2d(ch, cfg.out_channels, 3, padding=1)))

    def validate_input_size(self, h: int, w: int) -> None:
        """Raise ValueError unless H and W survive every halving exactly (skips must align)."""
        m = self.config.size_multiple
        if h <= 0 or w <= 0 or h % m or w % m:
            raise ValueError(
                f"DDAD's U-Net needs height and width divisible by {m} "
                f"({len(self.config.channel_mults) - 1} halvings), got {h}x{w}"
            )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Predict the noise in ``x`` (B, C, H, W) at timesteps ``t`` (B,) (float or int)."""
        emb = self.time_embedding[0](t).to(self.time_embedding[1].weight.dtype)
        emb = self.time_embedding[1:](emb)  # (B, 4*base)
        skips = []
        h = x
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)  # (B, out_channels, H, W)
