"""Convolution arithmetic: output sizes, receptive fields, and the seed's convolution by hand.

Output size of a convolution or pooling window along one axis (PyTorch's formula,
Dumoulin & Visin, "A guide to convolution arithmetic for deep learning", arXiv:1603.07285,
relationship 15 with dilation)::

    out = floor((n + pad_before + pad_after - dilation * (kernel - 1) - 1) / stride) + 1

TensorFlow's ``padding="SAME"`` (used in seed 004's Keras code) pads so that
``out = ceil(n / stride)``, the extra pixel going after; ``"VALID"`` means no padding.

Receptive field of stacked layers (Araujo, Norris, Sim, "Computing Receptive Fields of
Convolutional Neural Networks", Distill 2019, doi:10.23915/distill.00021), layer by layer
with ``k_eff = dilation * (kernel - 1) + 1``::

    r_out = r_in + (k_eff - 1) * j_in          # receptive field size in input pixels
    j_out = j_in * stride                        # distance between neighbouring outputs, in input pixels
    c_out = c_in + ((k_eff - 1) / 2 - pad_before) * j_in   # centre of the first output's field

starting from ``r = 1, j = 1, c = 0`` (pixel centres at 0, 1, ...).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from visionscale.errors import InvalidValueError

__all__ = [
    "LayerSpec",
    "conv_output_size",
    "padding_amounts",
    "receptive_fields",
    "parse_layer_spec",
    "conv2d_reference",
    "conv_params",
]

Padding = int | str


def _check_positive(**kw: int) -> None:
    for name, v in kw.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise InvalidValueError(f"{name} must be a positive integer, got {v!r}").about(name)


def padding_amounts(n: int, kernel: int, stride: int = 1, padding: Padding = 0, dilation: int = 1) -> tuple[int, int]:
    """Pixels added before and after along one axis.

    Args:
        padding: Pixels on each side (PyTorch), or ``"valid"`` (none) or ``"same"``
            (TensorFlow: enough for ``ceil(n / stride)`` outputs, odd extra pixel after).
    """
    _check_positive(n=n, kernel=kernel, stride=stride, dilation=dilation)
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return 0, 0
        if mode == "same":
            k_eff = dilation * (kernel - 1) + 1
            out = math.ceil(n / stride)
            total = max((out - 1) * stride + k_eff - n, 0)
            return total // 2, total - total // 2
        raise InvalidValueError(f"padding must be a number of pixels, 'same' or 'valid', "
                                f"got {padding!r}").about("padding")
    if isinstance(padding, bool) or int(padding) != padding or padding < 0:
        raise InvalidValueError(f"padding must be a non-negative integer, got {padding!r}").about("padding")
    return int(padding), int(padding)


def conv_output_size(n: int, kernel: int, stride: int = 1, padding: Padding = 0, dilation: int = 1,
                     ceil_mode: bool = False) -> int:
    """Output length of a convolution / pooling window along one axis.

    Args:
        n: Input length (pixels).
        kernel: Window size.
        stride: Step between windows.
        padding: Pixels on each side, ``"same"`` or ``"valid"`` (see :func:`padding_amounts`).
        dilation: Spacing of the kernel taps (1 = dense).
        ceil_mode: Pooling's ``ceil_mode``: a last partial window counts if it starts
            inside the input or the left padding (PyTorch's rule).

    Raises:
        InvalidValueError: Non-positive sizes, or a kernel larger than the padded input.
    """
    before, after = padding_amounts(n, kernel, stride, padding, dilation)
    k_eff = dilation * (kernel - 1) + 1
    span = n + before + after - k_eff
    if span < 0:
        raise InvalidValueError(f"kernel {kernel} (dilation {dilation}, {k_eff} px wide) does not fit an input of "
                                f"{n} px with padding {before}+{after}").about("kernel")
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= n + before:  # the last window would start in the right padding
        out -= 1
    return out


@dataclass(frozen=True)
class LayerSpec:
    """One sliding-window layer (square kernel) for :func:`receptive_fields`.

    Attributes:
        kernel: Window size.
        stride: Step.
        padding: Pixels per side, ``"same"`` or ``"valid"``.
        dilation: Tap spacing.
        name: Label in the result (``"conv1"``, ``"pool"``...).
    """

    kernel: int
    stride: int = 1
    padding: Padding = 0
    dilation: int = 1
    name: str = ""

    def label(self) -> str:
        p = self.padding if isinstance(self.padding, str) else f"p{self.padding}"
        return f"k{self.kernel} s{self.stride} {p}" + (f" d{self.dilation}" if self.dilation != 1 else "")


_SPEC = re.compile(r"^(?:(?P<name>[a-z_]+):)?(?P<k>\d+)(?:s(?P<s>\d+))?(?:p(?P<p>\d+|same|valid))?(?:d(?P<d>\d+))?$")


def parse_layer_spec(text: str) -> LayerSpec:
    """``"3"``, ``"3s2"``, ``"3p1"``, ``"3s2psame"``, ``"pool:2s2"``, ``"3d2p2"`` -> :class:`LayerSpec`.

    Kernel first, then optional ``s<stride>``, ``p<padding|same|valid>``, ``d<dilation>``;
    an optional ``name:`` prefix labels the layer.
    """
    m = _SPEC.match(text.strip().lower())
    if m is None:
        raise InvalidValueError(f"bad layer spec {text!r}: expected KERNEL[sSTRIDE][pPADDING|psame|pvalid][dDILATION], "
                                f"e.g. 3p1, 2s2, 7s2p3, pool:2s2")
    p = m["p"] if m["p"] is not None else 0
    spec = LayerSpec(kernel=int(m["k"]), stride=int(m["s"] or 1), padding=int(p) if str(p).isdigit() else p,
                     dilation=int(m["d"] or 1), name=m["name"] or "")
    _check_positive(kernel=spec.kernel, stride=spec.stride, dilation=spec.dilation)
    return spec


def receptive_fields(layers: Sequence[LayerSpec], input_size: int) -> list[dict]:
    """Output size, receptive field, jump and first centre after each layer of a single path.

    Returns:
        One dict per layer: ``name, spec, in, out, rf, jump, start`` (``start`` = centre
        of the first output's field in input pixel coordinates, may be negative when the
        field reaches into the padding).
    """
    _check_positive(input_size=input_size)
    n, r, j, c = int(input_size), 1, 1, 0.0
    rows = []
    for i, layer in enumerate(layers):
        before, _ = padding_amounts(n, layer.kernel, layer.stride, layer.padding, layer.dilation)
        out = conv_output_size(n, layer.kernel, layer.stride, layer.padding, layer.dilation)
        k_eff = layer.dilation * (layer.kernel - 1) + 1
        r, c = r + (k_eff - 1) * j, c + ((k_eff - 1) / 2 - before) * j
        j *= layer.stride
        rows.append({"name": layer.name or f"layer{i + 1}", "spec": layer.label(), "in": n, "out": out,
                     "rf": r, "jump": j, "start": c})
        n = out
    return rows


def conv_params(kernel: int | tuple[int, int], in_channels: int, out_channels: int, bias: bool = True, groups: int = 1) -> int:
    """Parameters of a 2-D convolution: ``(kh * kw * in / groups + bias) * out``.

    Seed 004: 100 maps of 3x3 on an RGB image -> ``(3 * 3 * 3 + 1) * 100 = 2800``.
    """
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    if in_channels % groups or out_channels % groups:
        raise InvalidValueError(f"channels {in_channels}->{out_channels} are not divisible by "
                                f"groups={groups}").about("groups")
    return (kh * kw * (in_channels // groups) + int(bias)) * out_channels


def conv2d_reference(x: np.ndarray, w: np.ndarray, bias: float = 0.0, stride: int = 1, padding: Padding = 0) -> np.ndarray:
    """Seed 004's formula, written out: ``Z[i, j] = b + sum_u sum_v X[i*s + u, j*s + v] * W[u, v]``.

    Single channel, zero padding, cross-correlation (no kernel flip), as every deep
    learning framework computes "convolution". For teaching and as a test oracle.
    """
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    if x.ndim != 2 or w.ndim != 2:
        raise InvalidValueError(f"expected 2-D image and kernel, got {x.shape} and {w.shape}")
    (top, bottom), (left, right) = (padding_amounts(x.shape[0], w.shape[0], stride, padding),
                                    padding_amounts(x.shape[1], w.shape[1], stride, padding))
    xp = np.pad(x, ((top, bottom), (left, right)))
    oh = conv_output_size(x.shape[0], w.shape[0], stride, padding)
    ow = conv_output_size(x.shape[1], w.shape[1], stride, padding)
    z = np.empty((oh, ow))
    for i in range(oh):
        for j in range(ow):
            z[i, j] = bias + np.sum(xp[i * stride : i * stride + w.shape[0], j * stride : j * stride + w.shape[1]] * w)
    return z
