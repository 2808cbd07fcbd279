"""BlazeFace as an inference graph: the same function as :class:`~visionscale.face.blazeface.BlazeFace`,
laid out so that ONNX Runtime's CPU provider runs it without layout changes.

ONNX Runtime's CPU convolutions work in a blocked layout (``NCHWc``: channels in blocks of 16
with AVX-512, of 8 with AVX2); a graph is converted to it once, and every op that has no
blocked kernel costs a reorder out of the layout and back. BlazeFace's own graph has two such
ops in every block: the zero channels appended to the skip (``Pad`` on the channel axis) and,
as PyTorch eager runs it, a 2x2 max-pool written as ``reshape`` + ``amax``. In the export of
the eager module about a third of the CPU time went to ``ReorderInput`` / ``ReorderOutput``,
``Pad``, ``ReduceMax`` and unfused ``Add`` / ``Relu`` (measured with ONNX Runtime's profiler on
the front model).

Here every feature map carries its channels rounded up to a multiple of ``align`` (16), the
extra channels exactly zero (zero weights, zero bias; ``relu(0) = 0``). The blocked kernels pad
channels to that multiple anyway, so the padding costs nothing there, and a skip needs zero
channels only where the rounded width grows (4 of the front model's 16 blocks); those skips go
through a 1x1 identity convolution, which ONNX Runtime fuses with the block's add and ReLU.
Max-pooling is ``MaxPool``. In PyTorch the graph gives the same outputs as the source model
(the padded channels contribute exact zeros).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionscale.face.blocks import BlazeBlock, SameConv2d, SeparableConv

__all__ = ["BlazeFaceGraph", "ALIGN"]

ALIGN = 16  # ONNX Runtime's NCHWc block with AVX-512; a multiple of AVX2's 8


def _round_up(c: int, align: int) -> int:
    return -(-c // align) * align


def _padded(conv: nn.Conv2d, in_ch: int, out_ch: int) -> nn.Conv2d:
    """A copy of ``conv`` with zero-weight input and output channels added (same padding rule)."""
    depthwise = conv.groups > 1
    if depthwise and conv.groups != conv.in_channels:
        raise ValueError("only plain and depthwise convolutions can be padded")
    k, s = conv.kernel_size[0], conv.stride[0]
    groups = out_ch if depthwise else 1
    if isinstance(conv, SameConv2d):
        new = SameConv2d(in_ch, out_ch, k, s, groups=groups)
    else:
        new = nn.Conv2d(in_ch, out_ch, conv.kernel_size, conv.stride, conv.padding, groups=groups)
    with torch.no_grad():
        new.weight.zero_()
        new.bias.zero_()
        if depthwise:
            new.weight[: conv.out_channels] = conv.weight
        else:
            new.weight[: conv.out_channels, : conv.in_channels] = conv.weight
        new.bias[: conv.out_channels] = conv.bias
    return new.to(conv.weight.device, conv.weight.dtype)


class _Skip(nn.Module):
    """The skip branch: 2x2 max-pool for stride 2, zero channels via an identity 1x1 conv."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        eye = torch.zeros(out_ch, in_ch, 1, 1) if out_ch > in_ch else None
        if eye is not None:
            eye[torch.arange(in_ch), torch.arange(in_ch)] = 1.0
        self.register_buffer("eye", eye)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 2:
            x = F.max_pool2d(x, 2, 2, ceil_mode=bool(x.shape[-1] % 2 or x.shape[-2] % 2))
        return x if self.eye is None else F.conv2d(x, self.eye)


class _Block(nn.Module):
    """A BlazeBlock (single or double) or separable conv on channel-padded maps."""

    def __init__(self, block: nn.Module, in_ch: int, align: int) -> None:
        super().__init__()
        if isinstance(block, SeparableConv):
            self.out_ch = _round_up(block.pw.out_channels, align)
            self.convs = nn.ModuleList([_padded(block.dw, in_ch, in_ch), _padded(block.pw, in_ch, self.out_ch)])
            self.skip = None
            return
        if not isinstance(block, BlazeBlock):
            raise TypeError(f"no graph form for {type(block).__name__}")
        self.out_ch = _round_up(block.out_ch, align)
        convs = [_padded(block.dw1, in_ch, in_ch)]
        if block.double:
            mid = _round_up(block.pw1.out_channels, align)
            convs += [_padded(block.pw1, in_ch, mid), _padded(block.dw2, mid, mid), _padded(block.pw2, mid, self.out_ch)]
        else:
            convs.append(_padded(block.pw1, in_ch, self.out_ch))
        self.convs = nn.ModuleList(convs)
        self.skip = _Skip(in_ch, self.out_ch, block.stride)

    def forward(self, x: Tensor) -> Tensor:
        if self.skip is None:  # separable conv: dw -> pw -> ReLU
            return F.relu(self.convs[1](self.convs[0](x)))
        h = self.convs[1](self.convs[0](x))
        if len(self.convs) == 4:  # double block
            h = self.convs[3](self.convs[2](F.relu(h)))
        return F.relu(h + self.skip(x))


class BlazeFaceGraph(nn.Module):
    """The inference graph of a :class:`~visionscale.face.blazeface.BlazeFace` (module docstring).

    Same input ``(B, 3, S, S)`` in [-1, 1] and outputs ``regressors (B, N, 16)``,
    ``classificators (B, N, 1)``. A copy: later changes to ``net`` do not reach it.
    """

    def __init__(self, net: nn.Module, align: int = ALIGN) -> None:
        super().__init__()
        self.config = net.config
        self.model_info = net.model_info
        self.num_coords = net.num_coords
        c = _round_up(net.stem.out_channels, align)
        self.stem = _padded(net.stem, net.stem.in_channels, c)
        stages = []
        for stage in (net.stage1, net.stage2):
            blocks = []
            for block in stage:
                blocks.append(_Block(block, c, align))
                c = blocks[-1].out_ch
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2 = stages
        c1 = self.stage1[-1].out_ch
        self.cls1 = _padded(net.cls1, c1, net.cls1.out_channels)
        self.reg1 = _padded(net.reg1, c1, net.reg1.out_channels)
        self.cls2 = _padded(net.cls2, c, net.cls2.out_channels)
        self.reg2 = _padded(net.reg2, c, net.reg2.out_channels)
        self.register_buffer("anchors", net.anchors.clone(), persistent=False)
        self.eval()

    def validate_input_size(self, h: int, w: int) -> None:
        side = self.config.input_size
        if (h, w) != (side, side):
            from visionscale.errors import InvalidValueError

            raise InvalidValueError(f"BlazeFaceGraph[{self.config.name}] runs at {side}x{side} only, got {h}x{w}"
                                    ).about("image_size")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f1 = self.stage1(F.relu(self.stem(x)))  # (B, C1, S/8, S/8), C1 rounded up to `align`
        f2 = self.stage2(f1)
        b = x.shape[0]

        def flat(t: Tensor, width: int) -> Tensor:
            return t.permute(0, 2, 3, 1).reshape(b, -1, width)  # NHWC order, as TFLite's RESHAPE

        reg = torch.cat([flat(self.reg1(f1), self.num_coords), flat(self.reg2(f2), self.num_coords)], 1)
        cls = torch.cat([flat(self.cls1(f1), 1), flat(self.cls2(f2), 1)], 1)
        return reg, cls
