"""A synthetic ``.tflite`` writer for the importer's tests (tests/ is on sys.path: see conftest.py).

Writes a BlazeFace's convolutions the way MediaPipe's files store them, so the import path is
tested without any released model; shared by tests/face and tests/robustness.
"""

from __future__ import annotations

import numpy as np
import pytest

from visionscale.face.blazeface import BlazeFace


def write_tflite(net: BlazeFace, path, stride_override: dict | None = None) -> dict[str, np.ndarray]:
    """Write ``net``'s convolutions as a TFLite graph the way MediaPipe's files store them:
    FP16 kernels/biases in buffers, each behind a DEQUANTIZE op, CONV_2D / DEPTHWISE_CONV_2D in
    execution order with TF layouts. Returns the FP16-rounded torch-layout weights written."""
    fb = pytest.importorskip("flatbuffers", reason="flatbuffers (to build a synthetic .tflite) not installed")
    b = fb.Builder(1024)
    buffers = [b""]  # buffer 0 is the empty sentinel
    tensors = []  # (name, shape, type, buffer)
    ops = []  # (opcode index, inputs, outputs, kind, options)
    written = {}
    names = {id(m): n for n, m in net.named_modules()}

    def tensor(name, shape, ttype=0, data: bytes = b""):
        buf = 0
        if data:
            buffers.append(data)
            buf = len(buffers) - 1
        tensors.append((name, list(shape), ttype, buf))
        return len(tensors) - 1

    size = net.config.input_size
    x = tensor("input", [1, size, size, 3])
    for i, conv in enumerate(net.tflite_conv_order()):
        name = names[id(conv)]
        w = conv.weight.detach().numpy().astype(np.float16)
        bias = conv.bias.detach().numpy().astype(np.float16)
        depthwise = conv.groups > 1
        tf_w = w.transpose(1, 2, 3, 0) if depthwise else w.transpose(0, 2, 3, 1)  # [1,kh,kw,C] / [O,kh,kw,I]
        written[f"{name}.weight"] = w.astype(np.float32)
        written[f"{name}.bias"] = bias.astype(np.float32)
        kq = tensor(f"{name}/Kernel", tf_w.shape, 1, tf_w.tobytes())
        bq = tensor(f"{name}/Bias", bias.shape, 1, bias.tobytes())
        kd = tensor(f"{name}/Kernel_dequantize", tf_w.shape)
        bd = tensor(f"{name}/Bias_dequantize", bias.shape)
        ops.append((0, [bq], [bd], None, None))
        ops.append((0, [kq], [kd], None, None))
        y = tensor(name, [1, 1, 1, conv.out_channels])
        stride = (stride_override or {}).get(i, conv.stride[0])
        ops.append((2 if depthwise else 1, [x, kd, bd], [y], "dw" if depthwise else "conv", stride))
        x = y

    def vec_i32(values):
        return b.CreateNumpyVector(np.asarray(values, dtype=np.int32))

    def table_vec(offsets):
        b.StartVector(4, len(offsets), 4)
        for o in reversed(offsets):
            b.PrependUOffsetTRelative(o)
        return b.EndVector()

    buf_offs = []
    for data in buffers:
        d = b.CreateNumpyVector(np.frombuffer(data, dtype=np.uint8)) if data else None
        b.StartObject(3)
        if d is not None:
            b.PrependUOffsetTRelativeSlot(0, d, 0)
        buf_offs.append(b.EndObject())
    t_offs = []
    for name, shape, ttype, buf in tensors:
        n, s = b.CreateString(name), vec_i32(shape)
        b.StartObject(5)
        b.PrependUOffsetTRelativeSlot(0, s, 0)
        b.PrependInt8Slot(1, ttype, 0)
        b.PrependUint32Slot(2, buf, 0)
        b.PrependUOffsetTRelativeSlot(3, n, 0)
        t_offs.append(b.EndObject())
    op_offs = []
    for code, ins, outs, kind, stride in ops:
        iv, ov = vec_i32(ins), vec_i32(outs)
        opt, opt_type = None, 0
        if kind == "conv":  # Conv2DOptions: padding, stride_w, stride_h
            b.StartObject(6)
            b.PrependInt8Slot(0, 0, 1)  # SAME (force: 0 is also the schema default)
            b.PrependInt32Slot(1, stride, 0)
            b.PrependInt32Slot(2, stride, 0)
            opt, opt_type = b.EndObject(), 1
        elif kind == "dw":  # DepthwiseConv2DOptions: padding, stride_w, stride_h, depth_multiplier
            b.StartObject(7)
            b.PrependInt8Slot(0, 0, 1)
            b.PrependInt32Slot(1, stride, 0)
            b.PrependInt32Slot(2, stride, 0)
            b.PrependInt32Slot(3, 1, 0)
            opt, opt_type = b.EndObject(), 2
        b.StartObject(5)
        b.PrependUint32Slot(0, code, 0)
        b.PrependUOffsetTRelativeSlot(1, iv, 0)
        b.PrependUOffsetTRelativeSlot(2, ov, 0)
        if opt is not None:
            b.PrependUint8Slot(3, opt_type, 0)
            b.PrependUOffsetTRelativeSlot(4, opt, 0)
        op_offs.append(b.EndObject())
    tv, ov_, ins, outs = table_vec(t_offs), table_vec(op_offs), vec_i32([0]), vec_i32([len(tensors) - 1])
    b.StartObject(5)
    b.PrependUOffsetTRelativeSlot(0, tv, 0)
    b.PrependUOffsetTRelativeSlot(1, ins, 0)
    b.PrependUOffsetTRelativeSlot(2, outs, 0)
    b.PrependUOffsetTRelativeSlot(3, ov_, 0)
    sg = b.EndObject()
    code_offs = []
    for builtin in (6, 3, 4):  # DEQUANTIZE, CONV_2D, DEPTHWISE_CONV_2D
        b.StartObject(4)
        b.PrependInt8Slot(0, builtin, 0)
        b.PrependInt32Slot(2, 1, 0)
        b.PrependInt32Slot(3, builtin, 0)
        code_offs.append(b.EndObject())
    codes, sgs, bufs, desc = table_vec(code_offs), table_vec([sg]), table_vec(buf_offs), b.CreateString("synthetic")
    b.StartObject(5)
    b.PrependUint32Slot(0, 3, 0)
    b.PrependUOffsetTRelativeSlot(1, codes, 0)
    b.PrependUOffsetTRelativeSlot(2, sgs, 0)
    b.PrependUOffsetTRelativeSlot(3, desc, 0)
    b.PrependUOffsetTRelativeSlot(4, bufs, 0)
    b.Finish(b.EndObject(), file_identifier=b"TFL3")
    path.write_bytes(bytes(b.Output()))
    return written
