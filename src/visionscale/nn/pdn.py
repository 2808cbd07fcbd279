"""Patch Description Network (PDN), the teacher and student of EfficientAD.

Paper: K. Batzner, L. Heckler, R. König, "EfficientAD: Accurate Visual Anomaly Detection at
Millisecond-Level Latencies", WACV 2024, arXiv:2303.14535 (appendix: PDN-S and PDN-M layer
tables). No official code was released; the authors endorse the reimplementation
https://github.com/nelson1425/EfficientAD (``common.py``), anomalib follows it
(``anomalib/models/image/efficient_ad/torch_model.py``).

Padding: the paper's tables pad (conv 4x4 p3, avg-pool p1, conv 3x3 p1), which gives an
output of about H/4 (64x64 at 256x256). The endorsed reimplementation and anomalib default to
``padding=False`` (every conv and pool unpadded), which gives 56x56 at 256x256; each output
pixel then sees a full 33x33 patch and the anomaly map is padded by 4 before upsampling.
Both are supported; ``padding=True`` (the paper) is the default here.
"""

from __future__ import annotations

from typing import Literal

from torch import nn


def _out_len(n: int, kernel: int, stride: int, padding: int) -> int:
    # Conv2d / AvgPool2d (ceil_mode=False) output length along one axis.
    return (n + 2 * padding - kernel) // stride + 1


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class PDN(nn.Sequential):
    """A PDN: plain conv / ReLU / avg-pool stack, fully convolutional.

    Use :func:`pdn_small` or :func:`pdn_medium` to build one.
    """

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """Spatial output size for an ``h x w`` input (may be <= 0 if the input is too small)."""
        for layer in self:
            if isinstance(layer, (nn.Conv2d, nn.AvgPool2d)):
                k, s, p = _pair(layer.kernel_size), _pair(layer.stride), _pair(layer.padding)
                h, w = _out_len(h, k[0], s[0], p[0]), _out_len(w, k[1], s[1], p[1])
        return h, w

    def min_input_size(self) -> int:
        """Smallest side length that yields at least a 1x1 output (33 without padding)."""
        n = 1
        while self.output_size(n, n)[0] < 1:
            n += 1
        return n

    @property
    def out_channels(self) -> int:
        return [m for m in self if isinstance(m, nn.Conv2d)][-1].out_channels


def pdn_small(
    out_channels: int = 384, padding: bool = True, channels: tuple[int, int] = (128, 256)
) -> PDN:
    """PDN-S: 4 convs, 3 ReLUs, 2 avg-pools (9 layers), no ReLU after the last conv.

    Args:
        out_channels: 384 for the teacher, 768 for the student (2x384: the second half
            predicts the autoencoder's output).
        padding: Paper tables (True, output ~H/4) or unpadded (False, 56x56 at 256).
        channels: Hidden widths (paper: 128, 256); smaller for tiny test models.
    """
    c1, c2 = channels
    m = 1 if padding else 0
    return PDN(
        nn.Conv2d(3, c1, kernel_size=4, stride=1, padding=3 * m),  # (B, 128, H+3, W+3)
        nn.ReLU(inplace=True),
        nn.AvgPool2d(kernel_size=2, stride=2, padding=1 * m),  # (B, 128, ~H/2, ~W/2)
        nn.Conv2d(c1, c2, kernel_size=4, stride=1, padding=3 * m),
        nn.ReLU(inplace=True),
        nn.AvgPool2d(kernel_size=2, stride=2, padding=1 * m),  # (B, 256, ~H/4, ~W/4)
        nn.Conv2d(c2, c2, kernel_size=3, stride=1, padding=1 * m),
        nn.ReLU(inplace=True),
        # No ReLU after the last conv. Output (B, out, H/4, W/4) if padded.
        nn.Conv2d(c2, out_channels, kernel_size=4, stride=1, padding=0),
    )


def pdn_medium(
    out_channels: int = 384, padding: bool = True, channels: tuple[int, int] = (256, 512)
) -> PDN:
    """PDN-M: 6 convs (two of them 1x1), ReLU after all but the last, 2 avg-pools.

    Same spatial arithmetic as PDN-S (1x1 convs keep the size), so both give equal outputs.

    Args:
        out_channels: 384 for the teacher, 768 for the student.
        padding: Paper tables (True) or unpadded (False).
        channels: Hidden widths (paper: 256, 512).
    """
    c1, c2 = channels
    m = 1 if padding else 0
    return PDN(
        nn.Conv2d(3, c1, kernel_size=4, stride=1, padding=3 * m),
        nn.ReLU(inplace=True),
        nn.AvgPool2d(kernel_size=2, stride=2, padding=1 * m),
        nn.Conv2d(c1, c2, kernel_size=4, stride=1, padding=3 * m),
        nn.ReLU(inplace=True),
        nn.AvgPool2d(kernel_size=2, stride=2, padding=1 * m),
        nn.Conv2d(c2, c2, kernel_size=1, stride=1, padding=0),
        nn.ReLU(inplace=True),
        nn.Conv2d(c2, c2, kernel_size=3, stride=1, padding=1 * m),
        nn.ReLU(inplace=True),
        nn.Conv2d(c2, out_channels, kernel_size=4, stride=1, padding=0),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, kernel_size=1, stride=1, padding=0),
    )


def pdn(
    variant: Literal["s", "m"],
    out_channels: int = 384,
    padding: bool = True,
    channels: tuple[int, int] | None = None,
) -> PDN:
    """PDN-S (``"s"``) or PDN-M (``"m"``); ``channels=None`` uses the paper's widths."""
    if variant == "s":
        return pdn_small(out_channels, padding, channels or (128, 256))
    if variant == "m":
        return pdn_medium(out_channels, padding, channels or (256, 512))
    raise ValueError(f"unknown PDN variant {variant!r}, expected 's' or 'm'")


def pdn_output_size(h: int, w: int, padding: bool = True) -> tuple[int, int]:
    """Output size of PDN-S and PDN-M (identical) for an ``h x w`` input.

    padding=True: 256 -> 64 (=H/4 when H is divisible by 4); padding=False: 256 -> 56.
    """

    def one(n: int) -> int:
        m = 1 if padding else 0
        n = _out_len(n, 4, 1, 3 * m)
        n = _out_len(n, 2, 2, 1 * m)
        n = _out_len(n, 4, 1, 3 * m)
        n = _out_len(n, 2, 2, 1 * m)
        n = _out_len(n, 3, 1, 1 * m)
        return _out_len(n, 4, 1, 0)

    return one(h), one(w)
