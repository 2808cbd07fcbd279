"""A writer of dlib's serialisation (``serialize.h``) for the ``.dat`` readers' tests (tests/ is on
sys.path: see conftest.py): the primitives, and dlib's face descriptor network in dlib's file
order, so loading is tested without the released file (tests/face: dlib_resnet, dlib_embedder).
"""

from __future__ import annotations

import math

import numpy as np


def enc_int(v: int) -> bytes:
    mag = abs(v)
    body = mag.to_bytes((mag.bit_length() + 7) // 8, "little") if mag else b""
    return bytes([len(body) | (0x80 if v < 0 else 0)]) + body


def enc_float(x: float) -> bytes:
    if math.isnan(x):
        return enc_int(0) + enc_int(32002)
    if math.isinf(x):
        return enc_int(0) + enc_int(32000 if x > 0 else 32001)
    m, e = math.frexp(x)  # x = m * 2**e, 0.5 <= |m| < 1
    mantissa = int(m * (1 << 53))
    return enc_int(mantissa) + enc_int(e - 53)


def enc_str(s: str) -> bytes:
    return enc_int(len(s)) + s.encode("ascii")


def enc_tensor(a: np.ndarray, shape=None) -> bytes:
    a = np.asarray(a, dtype="<f4")
    shape = shape or (a.size, 1, 1, 1)
    return enc_int(2) + b"".join(enc_int(s) for s in shape) + a.tobytes()


def enc_alias(shape) -> bytes:
    return enc_int(1) + b"".join(enc_int(s) for s in shape)


def serialise(model) -> bytes:
    """``model`` (a DlibResNet, or any module with its ``dlib_layers()``) as dlib writes a cleaned ``anet_type``: loss, wrapper versions outside in,
    input layer, then each layer's details (and wrapper state) inside out."""
    layers = model.dlib_layers()
    out = [enc_int(1), enc_str("loss_metric_2"), enc_float(0.04), enc_float(0.6)]
    for i, e in enumerate(layers):
        out.append(enc_int(1 if e[0] in ("tag", "skip") else (3 if i == len(layers) - 1 else 2)))
    out += [enc_str("input_rgb_image_sized"), enc_float(122.782), enc_float(117.001), enc_float(104.298),
            enc_int(150), enc_int(150)]
    details = [e for e in layers if e[0] not in ("tag", "skip")]
    lr = b"".join(enc_float(v) for v in (1.0, 1.0, 1.0, 0.0))
    for j, e in enumerate(reversed(details)):
        kind = e[0]
        if kind == "con":
            conv = e[1]
            w = conv.weight.detach().numpy()
            b = conv.bias.detach().numpy()
            out += [enc_str("con_4"), enc_tensor(np.concatenate([w.ravel(), b.ravel()])),
                    *(enc_int(v) for v in (conv.out_channels, *conv.kernel_size, *conv.stride, *conv.padding)),
                    enc_alias(w.shape), enc_alias((1, conv.out_channels, 1, 1)), lr]
        elif kind == "affine":
            n = e[1].gamma.numel()
            gb = np.concatenate([e[1].gamma.detach().numpy(), e[1].beta.detach().numpy()])
            out += [enc_str("affine_"), enc_tensor(gb), enc_alias((1, n, 1, 1)), enc_alias((1, n, 1, 1)), enc_int(0)]
        elif kind in ("relu", "add_prev"):
            out.append(enc_str(kind + "_"))
        elif kind in ("max_pool", "avg_pool"):
            out += [enc_str(kind + "_2"), *(enc_int(v) for v in (*e[1:], 0, 0))]
        elif kind == "fc":
            fc = e[1]
            w = fc.weight.detach().numpy().T  # dlib's (num_inputs, num_outputs)
            out += [enc_str("fc_2"), enc_int(fc.out_features), enc_int(fc.in_features),
                    enc_tensor(w, (fc.in_features, fc.out_features, 1, 1)), enc_alias(w.shape + (1, 1)),
                    enc_alias((0, 0, 0, 0)), enc_int(1), lr]
        out += [b"110", *(enc_tensor(np.zeros(0), (0, 0, 0, 0)) for _ in range(3))]
        if j == 0:
            out.append(enc_int(1))
    return b"".join(out)
