"""EfficientAD: student-teacher PDNs plus an autoencoder, inference path.

Paper: K. Batzner, L. Heckler, R. König, "EfficientAD: Accurate Visual Anomaly Detection at
Millisecond-Level Latencies", WACV 2024, arXiv:2303.14535 (appendix: PDN and autoencoder
layer tables; quantile-based normalisation and combination of the two maps).
Code: no official release; the authors endorse https://github.com/nelson1425/EfficientAD
(``efficientad.py: predict``), anomalib's ``efficient_ad/torch_model.py`` follows it.

Input: an ImageNet-normalised image batch (the reference code normalises in its data
transform, outside the networks). Weights are random unless loaded; the normalisation
buffers default to identity (mean 0, std 1, quantiles 0 / 1) so an untrained model runs.

Sizes: the PDN accepts almost any input (>= 33 px per side without padding); the
autoencoder needs H, W >= 256 because five stride-2 convs shrink 256 to 8 and its 8x8
latent conv is unpadded. Non-square inputs work: every size is derived per axis.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionscale.components import Component, State, run_components
from visionscale.modelinfo import imagenet
from visionscale.nn.pdn import PDN, pdn, pdn_output_size
from visionscale.registry import register_model


@dataclass(frozen=True)
class EfficientADConfig:
    """Architecture of one EfficientAD model.

    Attributes:
        variant: ``"s"`` (PDN-S teacher and student) or ``"m"`` (PDN-M).
        out_channels: Teacher feature channels (384); the student has twice as many.
        padding: Padded PDNs as in the paper's tables (output ~H/4) or unpadded as in the
            endorsed reimplementation / anomalib (56x56 at 256, maps padded by 4 later).
        pdn_channels: Hidden PDN widths; None = paper (S: 128, 256; M: 256, 512).
        ae_base_channels: Autoencoder width: encoder b, b, 2b, 2b, 2b, 2b; decoder 2b (b=32).
        ae_latent_kernel: Kernel of the unpadded last encoder conv (8); the AE then needs
            H, W >= 32 * kernel. Tiny models use a smaller one to run at 64x64.
        ae_dropout: Dropout after each of the six 4x4 decoder convs (0.2).
    """

    variant: Literal["s", "m"] = "s"
    out_channels: int = 384
    padding: bool = True
    pdn_channels: tuple[int, int] | None = None
    ae_base_channels: int = 32
    ae_latent_kernel: int = 8
    ae_dropout: float = 0.2


class Resize(nn.Module):
    """Bilinear resize to a size given per call.

    A module (not a bare ``F.interpolate``) so that layer counts and forward hooks see the
    decoder's upsampling steps, whose target sizes depend on the input image.
    """

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class _DecoderBlock(nn.Module):
    """Resize -> conv -> ReLU (-> dropout)."""

    def __init__(self, cin: int, cout: int, kernel: int, padding: int, dropout: float | None):
        super().__init__()
        self.resize = Resize()
        self.conv = nn.Conv2d(cin, cout, kernel_size=kernel, stride=1, padding=padding)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout is not None else None

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        x = self.relu(self.conv(self.resize(x, size)))
        return self.dropout(x) if self.dropout is not None else x


class AutoEncoder(nn.Module):
    """EfficientAD's autoencoder: 6-conv encoder to a 1x1 latent (at 256), 8-conv decoder.

    Layers at 256x256 (the seed's count of 39 incl. activations, dropout and upsampling):
    encoder 6 convs + 5 ReLUs; decoder 7 resizes + 8 convs + 7 ReLUs + 6 dropouts.

    Args:
        out_channels: Output channels (384, the teacher's).
        padding: Whether the PDNs pad; sets the final size to the PDN output size.
        base_channels: Width ``b`` (32 in the paper).
        latent_kernel: Kernel of the last encoder conv (8 in the paper).
        dropout: Decoder dropout rate (0.2).
    """

    def __init__(
        self,
        out_channels: int = 384,
        padding: bool = True,
        base_channels: int = 32,
        latent_kernel: int = 8,
        dropout: float = 0.2,
    ):
        super().__init__()
        self.padding = padding
        b, c = base_channels, 2 * base_channels
        # Each 4x4 s2 p1 conv maps n -> floor(n / 2): 256 -> 128 -> 64 -> 32 -> 16 -> 8.
        self.encoder = nn.Sequential(
            nn.Conv2d(3, b, kernel_size=4, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(b, b, kernel_size=4, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(b, c, kernel_size=4, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, c, kernel_size=4, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, c, kernel_size=4, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, c, kernel_size=latent_kernel, stride=1, padding=0),  # (B, 64, 1, 1) at 256
        )
        # Six resize + 4x4 p2 conv blocks (each conv grows the map by 1: 3 -> 4, ..., 127 -> 128),
        # then a resize to the PDN output size and two 3x3 convs.
        self.decoder = nn.ModuleList(
            [_DecoderBlock(c, c, 4, 2, dropout) for _ in range(6)]
            + [_DecoderBlock(c, c, 3, 1, None)]
        )
        self.head = nn.Conv2d(c, out_channels, kernel_size=3, stride=1, padding=1)

    def encoder_output_size(self, h: int, w: int) -> tuple[int, int]:
        """Latent size for an ``h x w`` input (<= 0 means the input is too small)."""
        for layer in self.encoder:
            if isinstance(layer, nn.Conv2d):
                k, s, p = layer.kernel_size[0], layer.stride[0], layer.padding[0]
                h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        return h, w

    def min_input_size(self) -> int:
        """Smallest side length with a >= 1x1 latent (256 for the paper's autoencoder)."""
        n = 1
        while self.encoder_output_size(n, n)[0] < 1:
            n += 1
        return n

    def decoder_sizes(self, h: int, w: int) -> list[tuple[int, int]]:
        """Targets of the seven resizes for an ``h x w`` image.

        At 256: 3, 8, 15, 32, 63, 127 and the PDN output size (64 padded, 56 unpadded);
        generalised per axis as anomalib does (H/64-1, H/32, H/16-1, H/8, H/4-1, H/2-1).
        Clamped to >= 1, which only matters for tiny test models below 128 px.
        """

        def axis(n: int) -> list[int]:
            sizes = (n // 64 - 1, n // 32, n // 16 - 1, n // 8, n // 4 - 1, n // 2 - 1)
            return [max(1, v) for v in sizes]

        sizes = list(zip(axis(h), axis(w)))
        sizes.append(pdn_output_size(h, w, self.padding))
        return sizes

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        z = self.encoder(x)  # (B, 64, 1, 1) at 256x256
        for block, size in zip(self.decoder, self.decoder_sizes(h, w)):
            z = block(z, size)
        return self.head(z)  # (B, 384, h', w') = PDN output size


class EfficientAD(nn.Module):
    """EfficientAD inference: teacher, student and autoencoder, then the combined map.

    ``forward(x)`` returns ``{"anomaly_map": (B, 1, H, W), "pred_score": (B,)}`` and equals
    running :meth:`components` in order.
    """

    def __init__(self, config: EfficientADConfig | None = None):
        super().__init__()
        cfg = config or EfficientADConfig()
        self.config = cfg
        c = cfg.out_channels
        self.teacher: PDN = pdn(cfg.variant, c, cfg.padding, cfg.pdn_channels)
        # Student: first c channels imitate the teacher, last c imitate the autoencoder.
        self.student: PDN = pdn(cfg.variant, 2 * c, cfg.padding, cfg.pdn_channels)
        self.autoencoder = AutoEncoder(
            c, cfg.padding, cfg.ae_base_channels, cfg.ae_latent_kernel, cfg.ae_dropout
        )
        # Teacher feature normalisation (channel mean / std over the training images).
        self.register_buffer("teacher_mean", torch.zeros(1, c, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, c, 1, 1))
        # Map normalisation: 0.9 and 0.995 quantiles of validation maps (ref. `map_normalization`).
        for name in ("q_st_start", "q_ae_start"):
            self.register_buffer(name, torch.tensor(0.0))
        for name in ("q_st_end", "q_ae_end"):
            self.register_buffer(name, torch.tensor(1.0))
        # Tiles start on the PDN's stride (4). Within 24 px of an inner tile edge the PDN's
        # 33 px receptive field and the map's bilinear upsampling see the tile's padding;
        # beyond it the student-teacher map equals the whole image's. The autoencoder is not
        # local (its latent sees the whole input), so its map differs wherever tiles differ.
        self.model_info = imagenet(input_size=(256, 256), tile_align=4, tile_margin=24)  # the reference code's size

    def validate_input_size(self, h: int, w: int) -> None:
        """Raise ValueError if an ``h x w`` image is too small for the PDNs or the autoencoder."""
        if min(self.teacher.output_size(h, w)) < 1:
            n = self.teacher.min_input_size()
            raise ValueError(
                f"EfficientAD's PDN needs height and width >= {n} (an unpadded PDN sees 33x33 "
                f"patches), got {h}x{w}"
            )
        if min(self.autoencoder.encoder_output_size(h, w)) < 1:
            n = self.autoencoder.min_input_size()
            k = self.config.ae_latent_kernel
            raise ValueError(
                f"EfficientAD's autoencoder needs height and width >= {n}: five stride-2 convs "
                f"divide the size by 32 and its {k}x{k} latent conv is unpadded, got {h}x{w}"
            )

    def components(self) -> list[Component]:
        """Teacher, student, autoencoder; the last one also combines the maps."""
        c = self.config.out_channels

        def run_teacher(state: State) -> State:
            x = state["image"]
            self.validate_input_size(*x.shape[-2:])
            t = self.teacher(x)  # (B, 384, h', w')
            return {"teacher": (t - self.teacher_mean) / self.teacher_std}

        def run_student(state: State) -> State:
            return {"student": self.student(state["image"])}  # (B, 768, h', w')

        def run_autoencoder(state: State) -> State:
            x = state["image"]
            ae = self.autoencoder(x)  # (B, 384, h', w')
            t, s = state["teacher"], state["student"]
            map_st = torch.mean((t - s[:, :c]) ** 2, dim=1, keepdim=True)  # (B, 1, h', w')
            map_ae = torch.mean((ae - s[:, c:]) ** 2, dim=1, keepdim=True)
            map_st = 0.1 * (map_st - self.q_st_start) / (self.q_st_end - self.q_st_start)
            map_ae = 0.1 * (map_ae - self.q_ae_start) / (self.q_ae_end - self.q_ae_start)
            amap = 0.5 * map_st + 0.5 * map_ae
            if not self.config.padding:
                # Unpadded PDN outputs are the centres of 33x33 patches: pad 4 to realign.
                amap = F.pad(amap, (4, 4, 4, 4))
            amap = F.interpolate(amap, size=x.shape[-2:], mode="bilinear", align_corners=False)
            return {
                "autoencoder": ae,
                "map_st": map_st,
                "map_ae": map_ae,
                "anomaly_map": amap,  # (B, 1, H, W)
                "pred_score": amap.amax(dim=(1, 2, 3)),  # (B,)
            }

        return [
            Component("teacher", self.teacher, run_teacher),
            Component("student", self.student, run_student),
            # Also holds the (cheap, parameter-free) map combination and upsampling.
            Component("autoencoder", self.autoencoder, run_autoencoder),
        ]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        state = run_components(self.components(), x)
        return {"anomaly_map": state["anomaly_map"], "pred_score": state["pred_score"]}


def _build(cfg: EfficientADConfig, **kw) -> EfficientAD:
    return EfficientAD(replace(cfg, **kw))


@register_model()
def efficientad_s(
    image_size: int | tuple[int, int] = 256, padding: bool = True, **kw
) -> EfficientAD:
    """EfficientAD-S (the seed's student-teacher count of 4,267,392 parameters is the S student).

    ``image_size`` is unused: all sizes follow the input. Extra keywords override
    :class:`EfficientADConfig` fields.
    """
    return _build(EfficientADConfig(variant="s"), padding=padding, **kw)


@register_model()
def efficientad_m(
    image_size: int | tuple[int, int] = 256, padding: bool = True, **kw
) -> EfficientAD:
    """EfficientAD-M (PDN-M teacher and student).

    Note: the seed study calls its model EfficientAD-M, but its parameter count (4,267,392)
    matches the PDN-S student; the M student has 11,615,488.
    """
    return _build(EfficientADConfig(variant="m"), padding=padding, **kw)


@register_model()
def efficientad_tiny(
    image_size: int | tuple[int, int] = 256, padding: bool = True, **kw
) -> EfficientAD:
    """Tiny EfficientAD-S for CPU tests: same code, narrow layers, runs from 64x64."""
    cfg = EfficientADConfig(
        variant="s", out_channels=16, pdn_channels=(8, 16), ae_base_channels=4, ae_latent_kernel=2
    )
    return _build(cfg, padding=padding, **kw)
