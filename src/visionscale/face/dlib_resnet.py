"""dlib's ResNet face descriptor (``dlib_face_recognition_resnet_model_v1.dat``) as a torch model.

The network is the one of dlib's ``dnn_face_recognition_ex.cpp`` (29 convolutions, 128-D output,
CC0 weights shipped in the ``face-recognition-models`` package)::

    input 150x150 RGB, (x - [122.782, 117.001, 104.298]) / 256
    conv 7x7/2 (32, padding 0) -> affine -> relu -> max_pool 3x3/2 (padding 0)
    3 x residual(32)
    residual_down(64)  + 3 x residual(64)
    residual_down(128) + 2 x residual(128)
    residual_down(256) + 2 x residual(256)
    residual_down(256)
    global average pool -> fc 256 -> 128 without bias (not normalised)

A residual block is ``relu(shortcut(x) + affine(conv3x3(relu(affine(conv3x3/s(x))))))``. dlib's
convolutions have padding 0 when the stride is 2 and padding 1 when it is 1, so the down blocks
shrink 35 -> 17 -> 8 -> 3 -> 1 while their shortcut, a 2x2 stride-2 average pool of the input
with the missing channels zero, gives 17, 8, 4, 2. dlib's ``add_prev`` adds tensors of
different shapes by zero-padding the smaller one at the bottom/right (and in the missing
channels), so the sum has the *larger* size (4x4, then 2x2) and the global pool averages over it.
``affine`` is a per-channel ``gamma * x + beta`` (batch norm folded in at training time).

:func:`load_dlib_resnet` parses the ``.dat`` with :class:`~visionscale.io.dlib_dat.DatCursor` in
the file's order (loss layer, one version per wrapper from the outside in, input layer, then
each layer's details from the inside out, each followed by the wrapper's state) and checks
every layer's kind and configuration against this architecture before loading its weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from visionscale.components import Component
from visionscale.io.dlib_dat import DatCursor, find_dat

__all__ = ["DlibResNet", "DlibTrunk", "dlib_layers", "read_dlib_resnet", "load_dlib_resnet", "preprocess", "DLIB_MEAN_RGB", "DLIB_INPUT_SIZE",
           "DLIB_DAT_NAME", "DLIB_DAT_SIZE", "find_dlib_dat"]

DLIB_MEAN_RGB = (122.782, 117.001, 104.298)
DLIB_INPUT_SIZE = 150
DLIB_DAT_NAME = "dlib_face_recognition_resnet_model_v1.dat"
DLIB_DAT_SIZE = 22_466_066

# (num_filters, stride of the first conv of the block) for each residual block, input to output.
_BLOCKS = ([(32, 1)] * 3
           + [(64, 2)] + [(64, 1)] * 3
           + [(128, 2)] + [(128, 1)] * 2
           + [(256, 2)] + [(256, 1)] * 2
           + [(256, 2)])


def preprocess(rgb: torch.Tensor) -> torch.Tensor:
    """dlib's ``input_rgb_image`` normalisation: ``(x - mean) / 256`` per RGB channel.

    ``rgb`` is ``(N, 3, H, W)`` in the 0..255 range (uint8 values as floats).
    """
    mean = torch.tensor(DLIB_MEAN_RGB, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return (rgb - mean) / 256.0


def _conv(cin: int, cout: int, k: int, stride: int) -> nn.Conv2d:
    # dlib's con_ default padding: 0 for stride != 1, else kernel // 2.
    return nn.Conv2d(cin, cout, k, stride=stride, padding=0 if stride != 1 else k // 2, bias=True)


class Affine(nn.Module):
    """Per-channel ``gamma * x + beta`` (dlib's ``affine_`` in its per-channel mode)."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1) + self.beta.view(1, -1, 1, 1)


def add_prev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev``: zero-pad the smaller tensor (channels, bottom rows, right columns)
    to the larger size in each dimension, then add."""
    c = max(a.shape[1], b.shape[1])
    h = max(a.shape[2], b.shape[2])
    w = max(a.shape[3], b.shape[3])

    def grow(t: torch.Tensor) -> torch.Tensor:
        dc, dh, dw = c - t.shape[1], h - t.shape[2], w - t.shape[3]
        if dc or dh or dw:
            t = F.pad(t, (0, dw, 0, dh, 0, dc))
        return t

    return grow(a) + grow(b)


class Residual(nn.Module):
    """conv3x3/stride - affine - relu - conv3x3 - affine, added to the (pooled) input, then relu."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv1 = _conv(cin, cout, 3, stride)
        self.affine1 = Affine(cout)
        self.conv2 = _conv(cout, cout, 3, 1)
        self.affine2 = Affine(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        shortcut = x if self.stride == 1 else F.avg_pool2d(x, 2, 2)
        return F.relu(add_prev(y, shortcut))


class DlibTrunk(nn.Module):
    """dlib's network up to and including the global average pool: normalised ``(N, 3, H, W)``
    (see :func:`preprocess`) -> ``(N, 256)``. The backbone of the registered embedder
    (:mod:`visionscale.face.dlib_embedder`); :class:`DlibResNet` adds the fc layer."""

    num_features = 256

    def __init__(self):
        super().__init__()
        self.conv1 = _conv(3, 32, 7, 2)
        self.affine1 = Affine(32)
        blocks = []
        cin = 32
        for cout, stride in _BLOCKS:
            blocks.append(Residual(cin, cout, stride))
            cin = cout
        self.blocks = nn.ModuleList(blocks)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.affine1(self.conv1(x)))  # (N, 32, 72, 72) at 150 px
        return F.max_pool2d(x, 3, 2)  # dlib's max_pool<3,3,2,2>: padding 0 -> (N, 32, 35, 35)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)  # ... -> (N, 256, 2, 2) at 150 px
        return x.mean(dim=(2, 3))  # (N, 256)

    def stages(self) -> list[nn.Sequential]:
        """The residual blocks grouped by resolution (a new stage at each downsampling block):
        3 x 32, 4 x 64, 3 x 128, 3 x 256, then the last downsampling block alone."""
        groups: list[list[nn.Module]] = []
        for block in self.blocks:
            if block.stride != 1 or not groups:
                groups.append([])
            groups[-1].append(block)
        return [nn.Sequential(*g) for g in groups]  # not registered: no new state-dict keys

    def components(self) -> list[Component]:
        """``stem``, ``stage1``..``stage5`` and ``pool`` (ends with ``{"output": (N, 256)}``)."""
        stem = nn.Sequential(self.conv1, self.affine1)  # parameters of the stem; run by self.stem
        parts = [Component("stem", stem, lambda s: {"stem": self.stem(s["image"])})]
        prev = "stem"
        for i, stage in enumerate(self.stages(), 1):
            parts.append(Component(f"stage{i}", stage, _stage_run(stage, prev, f"stage{i}")))
            prev = f"stage{i}"
        last = prev
        parts.append(Component("pool", nn.Identity(), lambda s: {"output": s[last].mean(dim=(2, 3))}))
        return parts


def _stage_run(module: nn.Module, src: str, dst: str):
    def run(state: dict) -> dict:
        return {dst: module(state[src])}

    return run


def dlib_layers(trunk: DlibTrunk, fc: nn.Linear) -> list[tuple]:
    """The network as dlib serialises it, from the outside (loss side) in: entries
    ``("con", conv)``, ``("affine", affine)``, ``("relu",)``, ``("max_pool", nr, nc, sy, sx)``,
    ``("avg_pool", nr, nc, sy, sx)``, ``("add_prev",)``, ``("fc", linear)``, ``("tag",)``
    and ``("skip",)`` (tags and skips are wrappers without details)."""
    out: list[tuple] = [("fc", fc), ("avg_pool", 0, 0, 1, 1)]
    for block in reversed(trunk.blocks):
        out += [("relu",), ("add_prev",)]
        if block.stride != 1:
            out += [("avg_pool", 2, 2, 2, 2), ("skip",), ("tag",)]
        out += [("affine", block.affine2), ("con", block.conv2), ("relu",),
                ("affine", block.affine1), ("con", block.conv1), ("tag",)]
    out += [("max_pool", 3, 3, 2, 2), ("relu",), ("affine", trunk.affine1), ("con", trunk.conv1)]
    return out


class DlibResNet(nn.Module):
    """dlib's 29-conv ResNet face descriptor: :class:`DlibTrunk` then a 256 -> 128 fc without bias.

    ``forward`` takes ``(N, 3, 150, 150)`` RGB in the 0..255 range (float) and applies
    :func:`preprocess` itself; :meth:`features` takes already normalised input. The output is
    ``(N, 128)``, *not* normalised (dlib compares descriptors by Euclidean distance, 0.6 = same
    person).
    """

    def __init__(self):
        super().__init__()
        self.trunk = DlibTrunk()
        self.fc = nn.Linear(DlibTrunk.num_features, 128, bias=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.trunk(x))

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.features(preprocess(rgb))

    def dlib_layers(self) -> list[tuple]:
        """See :func:`dlib_layers`."""
        return dlib_layers(self.trunk, self.fc)


# -- loading ---------------------------------------------------------------------------------------

def _read_con(c: DatCursor, conv: nn.Conv2d, where: str) -> None:
    start = c.pos
    params = c.read_tensor(f"{where} params")
    cfg = [c.read_int(f"{where} setting") for _ in range(7)]
    want = [conv.out_channels, *conv.kernel_size, *conv.stride, *conv.padding]
    if cfg != want:
        raise c.error(f"{where}: (num_filters, nr, nc, stride y/x, padding y/x) = {cfg}, "
                      f"the architecture needs {want}", start)
    wshape = c.read_alias_tensor(f"{where} filters alias")
    bshape = c.read_alias_tensor(f"{where} biases alias")
    for _ in range(4):
        c.read_float(f"{where} learning-rate/decay multiplier")
    w_n, b_n = conv.weight.numel(), conv.bias.numel()
    if params.size != w_n + b_n or wshape != tuple(conv.weight.shape) or bshape != (1, conv.out_channels, 1, 1):
        raise c.error(f"{where}: params of {params.size} values, filters {wshape}, biases {bshape} "
                      f"do not fit a {tuple(conv.weight.shape)} convolution with bias", start)
    flat = params.reshape(-1)
    _check_finite(c, flat, where, start)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(flat[:w_n].reshape(conv.weight.shape).copy()))
        conv.bias.copy_(torch.from_numpy(flat[w_n:].copy()))


def _read_affine(c: DatCursor, affine: Affine, where: str) -> None:
    start = c.pos
    params = c.read_tensor(f"{where} params")
    g = c.read_alias_tensor(f"{where} gamma alias")
    b = c.read_alias_tensor(f"{where} beta alias")
    mode = c.read_int(f"{where} mode")
    n = affine.gamma.numel()
    if params.size != 2 * n or g != (1, n, 1, 1) or b != (1, n, 1, 1) or mode != 0:
        raise c.error(f"{where}: params of {params.size} values, gamma {g}, beta {b}, mode {mode}; "
                      f"the architecture needs per-channel (mode 0) gamma and beta of {n}", start)
    flat = params.reshape(-1)
    _check_finite(c, flat, where, start)
    with torch.no_grad():
        affine.gamma.copy_(torch.from_numpy(flat[:n].copy()))
        affine.beta.copy_(torch.from_numpy(flat[n:].copy()))


def _read_fc(c: DatCursor, fc: nn.Linear, where: str) -> None:
    start = c.pos
    num_outputs = c.read_int(f"{where} num_outputs")
    num_inputs = c.read_int(f"{where} num_inputs")
    params = c.read_tensor(f"{where} params")
    w = c.read_alias_tensor(f"{where} weights alias")
    c.read_alias_tensor(f"{where} biases alias")
    bias_mode = c.read_int(f"{where} bias mode")
    for _ in range(4):
        c.read_float(f"{where} learning-rate/decay multiplier")
    if ((num_outputs, num_inputs) != (fc.out_features, fc.in_features) or bias_mode != 1
            or params.size != fc.in_features * fc.out_features or w != (fc.in_features, fc.out_features, 1, 1)):
        raise c.error(f"{where}: {num_inputs} -> {num_outputs}, bias mode {bias_mode}, params "
                      f"{params.shape}; the architecture needs {fc.in_features} -> {fc.out_features} "
                      "without bias (mode 1)", start)
    flat = params.reshape(-1)
    _check_finite(c, flat, where, start)
    # dlib: y = x @ W with W of shape (num_inputs, num_outputs); torch's Linear stores W.T.
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(flat.reshape(fc.in_features, fc.out_features).T.copy()))


def _check_finite(c: DatCursor, values: np.ndarray, where: str, start: int) -> None:
    if not np.isfinite(values).all():
        raise c.error(f"{where}: weights contain NaN or inf", start)


def _read_details(c: DatCursor, entry: tuple, index: int) -> None:
    kind = entry[0]
    where = f"layer {index} ({kind})"
    start = c.pos
    if kind == "con":
        c.expect_str("con_4", f"{where} tag")
        _read_con(c, entry[1], where)
    elif kind == "affine":
        c.expect_str("affine_", f"{where} tag")
        _read_affine(c, entry[1], where)
    elif kind == "relu":
        c.expect_str("relu_", f"{where} tag")
    elif kind == "add_prev":
        c.expect_str("add_prev_", f"{where} tag")
    elif kind in ("max_pool", "avg_pool"):
        c.expect_str(f"{kind}_2", f"{where} tag")
        cfg = [c.read_int(f"{where} setting") for _ in range(6)]
        want = [*entry[1:], 0, 0]
        if cfg != want:
            raise c.error(f"{where}: (nr, nc, stride y/x, padding y/x) = {cfg}, the architecture "
                          f"needs {want}", start)
    elif kind == "fc":
        c.expect_str("fc_2", f"{where} tag")
        _read_fc(c, entry[1], where)
    else:  # pragma: no cover - dlib_layers() only yields the kinds above
        raise AssertionError(kind)


def _read_wrapper_state(c: DatCursor, index: int, innermost: bool) -> None:
    """What an ``add_layer`` writes after its details: three flags and three (empty, in a
    cleaned net) tensors; the innermost one (version 3) adds its sample expansion factor."""
    where = f"layer {index} state"
    for _ in range(3):
        c.read_bool(where)
    for _ in range(3):
        c.read_tensor(f"{where} tensor")
    if innermost:
        c.read_int(f"{where} sample expansion factor")


def read_dlib_resnet(data: bytes, model: nn.Module, name: str = "<bytes>") -> dict:
    """Parse dlib's serialised face descriptor network from ``data`` into ``model`` (in place):
    a :class:`DlibResNet` or any module with its ``dlib_layers()`` (the registered embedder).

    Returns facts about the file (``loss``, ``margin``, ``distance_threshold``, ``input``,
    ``mean_rgb``, ``input_size``, ``convs``, ``affines``). Raises
    :class:`~visionscale.errors.InvalidFileError` naming ``name`` and the byte offset if the
    file is truncated, has trailing bytes, or does not describe this architecture.
    """
    c = DatCursor(data, name)
    layers = model.dlib_layers()
    # The loss wrapper (add_loss_layer, version 1) and loss_metric_ details.
    c.expect_int(1, "loss wrapper version")
    loss = c.expect_str(("loss_metric_2",), "loss layer tag")
    margin = c.read_float("loss margin")
    threshold = c.read_float("loss distance threshold")
    # One version per wrapper, outside in: 2 = add_layer, 1 = tag/skip, 3 = the innermost add_layer.
    for i, entry in enumerate(layers):
        innermost = i == len(layers) - 1
        want = 1 if entry[0] in ("tag", "skip") else (3 if innermost else 2)
        c.expect_int(want, f"version of wrapper {i} ({entry[0]})")
    start = c.pos
    input_tag = c.expect_str(("input_rgb_image_sized", "input_rgb_image"), "input layer tag")
    mean = tuple(c.read_float("input channel mean") for _ in range(3))
    if input_tag == "input_rgb_image_sized":
        size = (c.read_int("input rows"), c.read_int("input columns"))
    else:
        size = None
    if not all(abs(m - ref) < 1e-3 for m, ref in zip(mean, DLIB_MEAN_RGB)):
        raise c.error(f"input channel means {mean} differ from dlib's {DLIB_MEAN_RGB}", start)
    details = [e for e in layers if e[0] not in ("tag", "skip")]
    for j, entry in enumerate(reversed(details)):
        _read_details(c, entry, j)
        _read_wrapper_state(c, j, innermost=j == 0)
    if not c.at_end():
        raise c.error(f"{c.remaining} unexpected bytes after the network")
    return {"loss": loss, "margin": margin, "distance_threshold": threshold, "input": input_tag,
            "mean_rgb": mean, "input_size": size,
            "convs": sum(e[0] == "con" for e in details), "affines": sum(e[0] == "affine" for e in details)}


def load_dlib_resnet(path: str | os.PathLike) -> DlibResNet:
    """A :class:`DlibResNet` in eval mode with the weights of dlib's ``.dat`` file at ``path``.

    Raises :class:`~visionscale.errors.InvalidFileError` (file and byte offset) for a truncated
    or foreign file.
    """
    path = Path(path)
    data = path.read_bytes()
    model = DlibResNet()
    read_dlib_resnet(data, model, str(path))
    return model.eval()


def find_dlib_dat() -> Path | None:
    """The descriptor ``.dat``: ``$VISIONSCALE_DLIB_DAT``, else the one inside an installed
    ``face_recognition_models`` package (found by path: its ``__init__`` imports
    ``pkg_resources``), else ``None``."""
    return find_dat(DLIB_DAT_NAME, "VISIONSCALE_DLIB_DAT")
