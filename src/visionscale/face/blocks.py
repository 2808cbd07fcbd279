"""BlazeFace building blocks: TF-"SAME" convolutions, single and double BlazeBlocks.

Bazarevsky et al., "BlazeFace: Sub-millisecond Neural Face Detection on Mobile GPUs",
CVPR-W 2019 (arXiv:1907.05047), Fig. 1. MediaPipe's released networks use single blocks with
3x3 depthwise kernels; the paper's Table 1 uses 5x5 depthwise kernels and double blocks. Both
are built from these modules so that TFLite weights map onto them one convolution at a time.

Padding follows TensorFlow's ``SAME`` rule, which is asymmetric for stride 2 on even inputs
(e.g. a 3x3 stride-2 conv on 128 px pads 0 before and 1 after): PyTorch's symmetric padding
would shift every feature by half a pixel and break parity with the TFLite files.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SameConv2d", "BlazeBlock", "SeparableConv"]


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF ``SAME`` padding (before, after) along one axis of length ``size``."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow ``SAME`` padding (asymmetric where TF's is)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        symmetric = stride == 1 and kernel % 2 == 1
        super().__init__(in_ch, out_ch, kernel, stride, padding=kernel // 2 if symmetric else 0, groups=groups)
        self._symmetric = symmetric

    def forward(self, x: Tensor) -> Tensor:
        if not self._symmetric:
            k, s = self.kernel_size[0], self.stride[0]
            top, bottom = same_pads(x.shape[-2], k, s)
            left, right = same_pads(x.shape[-1], k, s)
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def _max_pool2(x: Tensor) -> Tensor:
    """2x2 stride-2 max-pool (TF SAME). On even sizes a reshape + amax, several times faster on
    CPU than ``max_pool2d`` (which also computes indices); same values."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        return F.max_pool2d(x, 2, 2, ceil_mode=True)
    return x.reshape(b, c, h // 2, 2, w // 2, 2).amax(dim=(3, 5))


class BlazeBlock(nn.Module):
    """Single or double BlazeBlock (paper Fig. 1).

    Single: depthwise k x k (stride s) -> 1x1 conv to ``out_ch``; plus the skip; ReLU.
    Double: depthwise k x k (stride s) -> 1x1 conv to ``mid_ch`` -> ReLU -> depthwise k x k
    -> 1x1 conv to ``out_ch``; plus the skip; ReLU. (The ReLU between the halves is our reading
    of Fig. 1; no released double-block model exists to check it against.)
    Skip: 2x2 max-pool when ``stride == 2``, then zero channels appended when ``out_ch > in_ch``
    (MediaPipe's ``channel_padding`` PAD op pads at the end of the channel axis).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, mid_ch: int | None = None) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"BlazeBlock stride must be 1 or 2, got {stride}")
        if out_ch < in_ch:
            raise ValueError(f"BlazeBlock cannot shrink channels ({in_ch} -> {out_ch}): the skip only zero-pads")
        self.in_ch, self.out_ch, self.stride, self.double = in_ch, out_ch, stride, mid_ch is not None
        first_out = mid_ch if mid_ch is not None else out_ch
        self.dw1 = SameConv2d(in_ch, in_ch, kernel, stride, groups=in_ch)
        self.pw1 = nn.Conv2d(in_ch, first_out, 1)
        if mid_ch is not None:
            self.dw2 = SameConv2d(mid_ch, mid_ch, kernel, 1, groups=mid_ch)
            self.pw2 = nn.Conv2d(mid_ch, out_ch, 1)

    def convs(self) -> list[nn.Conv2d]:
        """Convolutions in execution order (the order TFLite stores them)."""
        return [self.dw1, self.pw1, self.dw2, self.pw2] if self.double else [self.dw1, self.pw1]

    def forward(self, x: Tensor) -> Tensor:
        h = self.pw1(self.dw1(x))
        if self.double:
            h = self.pw2(self.dw2(F.relu(h)))
        skip = _max_pool2(x) if self.stride == 2 else x
        if self.out_ch > self.in_ch:
            skip = F.pad(skip, (0, 0, 0, 0, 0, self.out_ch - self.in_ch))  # (B, C_out, H, W)
        return F.relu(h + skip)


class SeparableConv(nn.Module):
    """Depthwise k x k (stride s) -> 1x1 conv -> ReLU, no skip (the last stage of MediaPipe's back model)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.dw = SameConv2d(in_ch, in_ch, kernel, stride, groups=in_ch)
        self.pw = nn.Conv2d(in_ch, out_ch, 1)

    def convs(self) -> list[nn.Conv2d]:
        return [self.dw, self.pw]

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.pw(self.dw(x)))


def conv_layers(module: nn.Module) -> list[nn.Conv2d]:
    """All convolutions of a block or stem in execution order."""
    if hasattr(module, "convs"):
        return module.convs()
    if isinstance(module, nn.Conv2d):
        return [module]
    raise TypeError(f"no convolutions known for {type(module).__name__}")

