"""Conv arithmetic by hand (incl. seed 004's 5x5 / 3x3 examples), layer tables, filter and
feature-map grids, and `visionscale inspect` in-process."""

import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import typer
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from visionscale.classify.convarith import (
    LayerSpec,
    conv2d_reference,
    conv_output_size,
    conv_params,
    padding_amounts,
    parse_layer_spec,
    receptive_fields,
)
from visionscale.classify.inspect import (
    InspectError,
    feature_grid_png,
    feature_maps,
    filter_grid_png,
    first_conv_layer,
    layer_table,
)
from visionscale.cli.classify import app as classify_app
from visionscale.cli.inspect import inspect_cmd
from visionscale.registry import create

# Seed 004, "Filters/Features/Kernels": a 5x5 single-channel "smiley" and two 3x3 filters.
X = np.array([[0, 1, 0, 1, 0],
              [0, 1, 0, 1, 0],
              [0, 0, 0, 0, 0],
              [1, 0, 0, 0, 1],
              [0, 1, 1, 1, 0]])
W_VERTICAL = np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]])
W_BOTTOM_ROW = np.array([[0, 0, 0], [0, 0, 0], [1, 1, 1]])
# Hand-computed with zero padding 1 (the seed's spreadsheet pads X to 7x7): each output is
# the sum of the 3 pixels the filter's ones cover.
Z_VERTICAL = np.array([[0, 2, 0, 2, 0],
                       [0, 2, 0, 2, 0],
                       [1, 1, 0, 1, 1],
                       [1, 1, 1, 1, 1],
                       [1, 1, 1, 1, 1]])
Z_BOTTOM_ROW = np.array([[1, 1, 2, 1, 1],
                         [0, 0, 0, 0, 0],
                         [1, 1, 0, 1, 1],
                         [1, 2, 3, 2, 1],
                         [0, 0, 0, 0, 0]])
# The seed's pooling spreadsheet: S1 = MAX(M1:N2), 2x2 windows, stride 2, no padding.
POOLED_BOTTOM_ROW = np.array([[1, 2], [2, 3]])


def _app():
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.add_typer(classify_app, name="classify")
    app.command("inspect")(inspect_cmd)
    return app


runner = CliRunner()


# ---------------------------------------------------------------- conv arithmetic


@pytest.mark.parametrize("w, z", [(W_VERTICAL, Z_VERTICAL), (W_BOTTOM_ROW, Z_BOTTOM_ROW)])
def test_seed_5x5_image_3x3_filters_by_hand(w, z):
    assert conv_output_size(5, 3, padding=1) == 5
    np.testing.assert_array_equal(conv2d_reference(X, w, padding=1), z)
    # PyTorch's conv2d is the same cross-correlation.
    t = F.conv2d(torch.tensor(X, dtype=torch.float32)[None, None], torch.tensor(w, dtype=torch.float32)[None, None], padding=1)
    np.testing.assert_array_equal(t[0, 0].numpy(), z)
    assert conv_output_size(5, 3) == 3
    # Without padding ("VALID") only the 3x3 interior remains: the outputs whose window
    # never touched the padding.
    np.testing.assert_array_equal(conv2d_reference(X, w), z[1:4, 1:4])


def test_seed_pooling_of_the_second_feature_map():
    assert conv_output_size(5, 2, stride=2) == 2  # the last row/column is dropped (VALID)
    pooled = F.max_pool2d(torch.tensor(Z_BOTTOM_ROW, dtype=torch.float32)[None, None], 2)
    np.testing.assert_array_equal(pooled[0, 0].numpy(), POOLED_BOTTOM_ROW)


def test_strided_conv_matches_the_seed_formula():
    # Z[i, j] = b + sum_u sum_v X[i*s + u, j*s + v] W[u, v] with s = 2, padding 1.
    z = conv2d_reference(X, W_VERTICAL, bias=0.5, stride=2, padding=1)
    assert z.shape == (3, 3) and conv_output_size(5, 3, stride=2, padding=1) == 3
    np.testing.assert_array_equal(z, Z_VERTICAL[::2, ::2] + 0.5)


def test_seed_keras_model_sizes_and_parameters():
    # Seed 004's malaria CNN on 100x100x3: conv 3x3 'same' -> pool 2 -> conv 3x3 'valid' -> pool 2.
    sizes = [100]
    for spec in ("3psame", "2s2", "3pvalid", "2s2"):
        s = parse_layer_spec(spec)
        sizes.append(conv_output_size(sizes[-1], s.kernel, s.stride, s.padding))
    assert sizes == [100, 100, 50, 48, 24]
    assert 24 * 24 * 64 == 36864  # flatten
    assert conv_params(3, 3, 32) == 896
    assert conv_params(3, 32, 64) == 18496
    assert 36864 + 1 == 36865  # dense to 1 unit
    assert conv_params(3, 3, 100) == 2800  # "(3 x 3 x 3 + 1) x 100 = 2800 params"
    assert conv_params(3, 3, 100, bias=False) == 2700
    assert sum(p.numel() for p in nn.Conv2d(32, 64, 3).parameters()) == 18496


@pytest.mark.parametrize("n, k, s, p, d, expected", [
    (224, 7, 2, 3, 1, 112),  # ResNet stem conv
    (112, 3, 2, 1, 1, 56),   # ResNet stem max pool
    (56, 1, 2, 0, 1, 28),    # 1x1 stride-2 shortcut
    (10, 3, 1, 0, 2, 6),     # dilation 2: the kernel spans 5 pixels
    (7, 3, 3, 0, 1, 2),      # windows at 0 and 3; the one at 6 would overrun
    (5, 5, 1, 0, 1, 1),
    (1, 3, 1, 1, 1, 1),
])
def test_output_size_by_hand_and_against_torch(n, k, s, p, d, expected):
    assert conv_output_size(n, k, s, p, d) == expected
    conv = nn.Conv2d(1, 1, k, stride=s, padding=p, dilation=d)
    assert conv(torch.zeros(1, 1, n, n)).shape[-1] == expected


def test_output_size_property_against_torch():
    rng = np.random.default_rng(0)
    for _ in range(200):
        k, s, p, d = int(rng.integers(1, 6)), int(rng.integers(1, 4)), int(rng.integers(0, 3)), int(rng.integers(1, 3))
        n = int(rng.integers(d * (k - 1) + 1 - 2 * p if d * (k - 1) + 1 - 2 * p > 0 else 1, 20))
        with torch.device("meta"):
            got = nn.Conv2d(1, 1, k, stride=s, padding=p, dilation=d)(torch.zeros(1, 1, n, n)).shape[-1]
        assert conv_output_size(n, k, s, p, d) == got, (n, k, s, p, d)
        if 2 * p <= k:  # max pool's own constraint
            got = F.max_pool2d(torch.zeros(1, 1, n, n, device="meta"), k, s, p, d, ceil_mode=True).shape[-1]
            assert conv_output_size(n, k, s, p, d, ceil_mode=True) == got, ("ceil", n, k, s, p, d)


def test_tensorflow_same_and_valid_padding_by_hand():
    # SAME gives ceil(n / s) outputs; the odd extra padding pixel goes after.
    assert padding_amounts(5, 3, 1, "same") == (1, 1)
    assert padding_amounts(5, 3, 2, "same") == (1, 1) and conv_output_size(5, 3, 2, "same") == 3
    assert padding_amounts(6, 3, 2, "same") == (0, 1) and conv_output_size(6, 3, 2, "same") == 3
    assert padding_amounts(4, 2, 1, "same") == (0, 1) and conv_output_size(4, 2, 1, "same") == 4
    assert conv_output_size(6, 3, 2, "valid") == 2
    with pytest.raises(ValueError, match="does not fit"):
        conv_output_size(4, 7)
    with pytest.raises(ValueError, match="positive"):
        conv_output_size(5, 3, stride=0)
    with pytest.raises(ValueError, match="padding"):
        conv_output_size(5, 3, padding="full")


def test_receptive_fields_by_hand():
    # Stacked 3x3 convs see 3, 5, 7 pixels; a 2x2/2 pool then doubles the step.
    rows = receptive_fields([LayerSpec(3, padding=1), LayerSpec(3, padding=1), LayerSpec(2, 2), LayerSpec(3, padding=1)], 32)
    assert [r["rf"] for r in rows] == [3, 5, 6, 10]
    assert [r["jump"] for r in rows] == [1, 1, 2, 2]
    assert [r["out"] for r in rows] == [32, 32, 16, 16]
    assert rows[2]["start"] == 0.5  # first pooled output is centred between pixels 0 and 1
    # ResNet stem: 7x7/2 p3 then 3x3/2 p1 -> field 11, step 4.
    stem = receptive_fields([parse_layer_spec("7s2p3"), parse_layer_spec("pool:3s2p1")], 224)
    assert [(r["out"], r["rf"], r["jump"]) for r in stem] == [(112, 7, 2), (56, 11, 4)]
    # Padding 3 on a 7-tap kernel (and 1 on 3) keeps the first output centred on pixel 0.
    assert stem[1]["name"] == "pool" and stem[0]["start"] == 0.0 and stem[1]["start"] == 0.0
    assert receptive_fields([parse_layer_spec("3"), parse_layer_spec("3s2")], 9)[1]["start"] == 2.0
    # Dilation 2 makes a 3-tap kernel span 5 pixels.
    assert receptive_fields([parse_layer_spec("3d2")], 9)[0]["rf"] == 5


def test_parse_layer_spec():
    assert parse_layer_spec("3") == LayerSpec(3)
    assert parse_layer_spec("7s2p3") == LayerSpec(7, 2, 3)
    assert parse_layer_spec("3psame") == LayerSpec(3, 1, "same")
    assert parse_layer_spec("conv:3s1p1d2") == LayerSpec(3, 1, 1, 2, name="conv")
    for bad in ("", "s2", "3x3", "0", "3s0"):
        with pytest.raises(ValueError):
            parse_layer_spec(bad)


# ---------------------------------------------------------------- layer table


class SeedCNN(nn.Sequential):
    """Seed 004's Keras malaria model, in PyTorch."""

    def __init__(self):
        super().__init__(nn.Conv2d(3, 32, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Dropout(0.5), nn.Linear(36864, 1))


def test_layer_table_reproduces_the_seed_model_summary():
    t = layer_table(SeedCNN(), 100)
    assert [(r.name, r.kind) for r in t.rows] == [("0", "Conv2d"), ("1", "MaxPool2d"), ("2", "Conv2d"), ("3", "MaxPool2d"),
                                                  ("4", "Flatten"), ("5", "Dropout"), ("6", "Linear")]
    assert [r.output_shape for r in t.rows] == [(1, 32, 100, 100), (1, 32, 50, 50), (1, 64, 48, 48), (1, 64, 24, 24),
                                               (1, 36864), (1, 36864), (1, 1)]
    assert [r.params for r in t.rows] == [896, 0, 18496, 0, 0, 0, 36865]
    assert t.total_params == 56257  # "Total params: 56,257"
    # Activation bytes are exactly C * H * W * 4 per fp32 output (CONVENTIONS example 7).
    assert t.rows[0].activation_bytes == 32 * 100 * 100 * 4
    assert [r.rf for r in t.rows[:4]] == [3, 4, 8, 10]
    assert [(r.in_size, r.out_size) for r in t.rows[:4]] == [(100, 100), (100, 50), (50, 48), (48, 24)]
    assert t.rows[6].rf is None  # after Flatten the field is not spatial any more


@pytest.mark.parametrize("size", [224, 97])
def test_resnet18_table_arithmetic_matches_real_shapes(size):
    net = create("resnet18")
    t = layer_table(net, size)
    windowed = [r for r in t.rows if r.window]
    assert len(windowed) == 20 + 1  # 20 convs (stem, 16 in blocks, 3 shortcuts) and the stem pool
    for r in windowed:
        assert r.out_size == r.output_shape[-2], r  # the helper agrees with the real pass
    names = [r.name for r in t.rows]
    assert names[:4] == ["conv1", "bn1", "relu", "maxpool"] and "layer4.1.conv2" in names
    assert sum(r.params for r in {r.name: r for r in t.rows}.values()) == t.total_params == 11_689_512
    last = next(r for r in reversed(t.rows) if r.name == "layer4.1.conv2")
    assert (last.rf, last.jump) == (435, 32)  # ResNet-18's classic 435 px receptive field
    stem = t.rows[0]
    assert stem.activation_bytes == 64 * conv_output_size(size, 7, 2, 3) ** 2 * 4
    assert t.components == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert t.activation_sum_bytes == sum(r.activation_bytes for r in t.rows)


def test_layer_table_leaves_the_model_alone():
    net = create("resnet_tiny")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    layer_table(net, 64)
    assert all(v.device.type == "cpu" for v in net.state_dict().values())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


# ---------------------------------------------------------------- filter and feature-map grids


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_filter_grid_of_a_tiny_model_shows_each_filter():
    net = create("resnet_tiny")  # conv1: 8 filters of 3x7x7
    with torch.no_grad():
        net.conv1.weight.zero_()
        net.conv1.weight[0, :, :, 3] = 1.0  # filter 0: a white vertical line on black
    name, png = filter_grid_png(net)
    assert name == "conv1"
    img = _png(png)
    f = math.ceil(48 / 7)  # tiles are enlarged to >= 48 px with a whole factor
    assert img.shape == (7 * f + 2 * 2, 8 * 7 * f + 9 * 2, 3)
    tile0 = img[2 : 2 + 7 * f, 2 : 2 + 7 * f]
    assert (tile0[:, 3 * f : 4 * f] == 255).all()
    assert (tile0[:, : 3 * f] == 0).all() and (tile0[:, 4 * f :] == 0).all()
    assert (img[:, 2 + 7 * f : 4 + 7 * f] == 255).all()  # white gap between tiles


def test_first_conv_is_found_in_execution_order():
    class Backwards(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.Conv2d(4, 2, 1)  # registered first, runs second
            self.early = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.late(self.early(x))

    assert first_conv_layer(Backwards())[0] == "early"


class TwoConvs(nn.Module):
    def __init__(self, in_ch=3):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, 2, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.conv(x)), 1))


def test_feature_maps_values_and_grid():
    net = TwoConvs().eval()
    with torch.no_grad():
        net.conv.weight.zero_()
        net.conv.weight[0, 0, 1, 1] = 1.0  # map 0 = red channel
        net.conv.weight[1, 2, 1, 1] = -1.0  # map 1 = minus blue channel
    x = torch.rand(1, 3, 8, 8)
    maps = feature_maps(net, x, "conv")
    assert maps.shape == (2, 8, 8)
    torch.testing.assert_close(maps[0], x[0, 0])
    torch.testing.assert_close(maps[1], -x[0, 2])
    pooled = feature_maps(net, x, "pool")
    torch.testing.assert_close(pooled, F.max_pool2d(maps[None], 2)[0])
    img = _png(feature_grid_png(maps, cols=8))
    f = math.ceil(64 / 8)
    assert img.shape == (8 * f + 4, 2 * 8 * f + 3 * 2, 3)
    # The brightest pixel of map 0 is where the red channel peaks (viridis: bright = yellow).
    r, c = divmod(int(x[0, 0].argmax()), 8)
    tile = img[2 : 2 + 8 * f, 2 : 2 + 8 * f].astype(int).sum(-1)
    assert tile[r * f + f // 2, c * f + f // 2] == tile.max()


def test_feature_maps_bad_layer_non_map_and_channel_mismatch():
    net = TwoConvs().eval()
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(InspectError, match=r"unknown layer 'convv' \(did you mean conv\?\); valid layers: conv, pool, fc"):
        feature_maps(net, x, "convv")
    with pytest.raises(InspectError, match="not feature maps"):
        feature_maps(net, x, "fc")
    gray = TwoConvs(in_ch=1).eval()
    with pytest.raises(InspectError, match="3 channels but the model's first layer conv expects 1"):
        feature_maps(gray, x, "conv")


# ---------------------------------------------------------------- CLI


def test_inspect_cli_writes_table_filters_and_feature_maps(tmp_path):
    img = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "out"
    res = runner.invoke(_app(), ["inspect", "resnet_tiny", "--out", str(out), "--layer", "layer1.0.conv1",
                                 "--image", str(img), "--size", "64"])
    assert res.exit_code == 0, res.output
    for name in ("layers.csv", "layers.md", "summary.json", "filters.png", "input.png", "feature_maps_layer1.0.conv1.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["feature_shape"] == [8, 16, 16] and summary["filters_layer"] == "conv1"
    assert summary["input_shape"] == [1, 3, 64, 64]
    assert summary["total_params"] == sum(p.numel() for p in create("resnet_tiny").parameters())
    assert _png((out / "input.png").read_bytes()).shape == (64, 64, 3)
    assert "layer1.0.conv1" in res.output and "random initialisation" in res.output
    csv_lines = (out / "layers.csv").read_text().splitlines()
    assert csv_lines[1].startswith("stem,conv1,Conv2d,1x8x32x32,1176,")


def test_inspect_cli_reads_a_weights_file_and_a_json_summary(tmp_path):
    from safetensors.torch import save_file

    net = create("resnet_tiny")
    with torch.no_grad():
        net.conv1.weight.fill_(0.5)
    w = tmp_path / "tiny.safetensors"
    save_file(net.state_dict(), str(w))
    res = runner.invoke(_app(), ["inspect", "resnet_tiny", "--weights", str(w), "--out", str(tmp_path / "o"), "--size", "32",
                                 "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["weights"].startswith("weights file")
    # All 8 filters are constant: every tile is the flat mid-gray of a constant array.
    img = _png((tmp_path / "o" / "filters.png").read_bytes())
    assert (img[2:-2, 2:9] == 128).all()


@pytest.mark.parametrize("args, message", [
    (["resnet_tiny", "--layer", "layer9"], "unknown layer 'layer9'"),
    (["resnet_tiny", "--layer", "fc"], "not feature maps"),
    (["no_such_model"], "unknown model 'no_such_model'"),
    (["resnet_tiny", "--weights", "IMAGENET1K_V1"], "unknown weights 'IMAGENET1K_V1' for resnet_tiny"),
    (["patchcore_tiny", "--weights", "DEFAULT"], "does not take named weights"),
    (["ddad_tiny", "--size", "30"], "divisible by"),
])
def test_inspect_cli_bad_input(tmp_path, args, message):
    out = tmp_path / "o"
    res = runner.invoke(_app(), ["inspect", *args, "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert message in res.stderr and res.stderr.startswith("error:")
    assert len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()  # nothing half-written


def test_inspect_cli_bad_weights_and_unreadable_image(tmp_path):
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong.safetensors"
    save_file({"conv1.weight": torch.zeros(8, 1, 7, 7)}, str(wrong))
    res = runner.invoke(_app(), ["inspect", "resnet_tiny", "--weights", str(wrong), "--out", str(tmp_path / "a")])
    assert res.exit_code == 2 and "do not fit" in res.stderr and "conv1.weight" in res.stderr
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really")
    res = runner.invoke(_app(), ["inspect", "resnet_tiny", "--image", str(bad), "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "broken.jpg" in res.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_classify_conv_cli_prints_the_seed_stack():
    res = runner.invoke(_app(), ["classify", "conv", "100", "3psame", "2s2", "3pvalid", "2s2", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["out"] for r in rows] == [100, 50, 48, 24]
    assert [r["rf"] for r in rows] == [3, 4, 8, 10]
    res = runner.invoke(_app(), ["classify", "conv", "5", "7"])
    assert res.exit_code == 2 and "does not fit" in res.stderr
