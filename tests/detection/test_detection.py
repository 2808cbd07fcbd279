"""Box ops, anchor matching, the detector, COCO / WIDER FACE readers, training, COCO AP, the CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from visionscale.detection import boxes as B
from visionscale.detection.coco import load_coco
from visionscale.detection.data import AnnotationError
from visionscale.detection.demo import DemoConfig, make_demo
from visionscale.detection.model import SingleStageDetector, ssd_tiny
from visionscale.detection.train import (
    TrainConfig,
    TrainError,
    coco_metrics,
    detection_loss,
    load_model,
    read_checkpoint,
    train,
)
from visionscale.detection.widerface import load_widerface

T = torch.tensor


# ----------------------------------------------------------------------------- boxes
def test_iou_hand_values():
    a = T([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 0, 5]])
    b = T([[0.0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    iou = B.box_iou(a, b)
    assert iou[0].tolist() == pytest.approx([1.0, 50 / 150, 0.0])
    assert iou[2].tolist() == [0.0, 0.0, 0.0]  # a degenerate box overlaps nothing, no NaN


def test_encode_decode_round_trip():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 100
    wh = torch.rand(200, 2, generator=g) * 50 + 1
    anchors = torch.cat([xy, xy + wh], 1)
    boxes = torch.cat([xy + torch.randn(200, 2, generator=g) * 5, xy + wh * (torch.rand(200, 2, generator=g) * 3 + 0.3)], 1)
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    for stds in ((1.0, 1.0, 1.0, 1.0), (0.1, 0.1, 0.2, 0.2)):
        torch.testing.assert_close(B.decode(anchors, B.encode(anchors, boxes, stds), stds), boxes, rtol=1e-4, atol=1e-3)
    assert B.encode(anchors, anchors).abs().max().item() < 1e-6
    # t_w = log(w / w_a): a box twice as wide as its anchor
    assert B.encode(T([[0.0, 0, 10, 10]]), T([[-5.0, 0, 15, 10]]))[0].tolist() == pytest.approx([0, 0, np.log(2), 0])


def test_matching_positive_negative_ignore_and_low_quality():
    gt = T([[0.0, 0, 10, 10], [100.0, 100, 104, 104]])  # the second is small: no anchor reaches 0.5
    anchors = T([
        [0.0, 0, 10, 10],  # IoU 1 -> gt 0
        [0.0, 0, 10, 12],  # IoU 0.833 -> gt 0
        [0.0, 0, 10, 20],  # IoU 0.5 -> positive (>= pos)
        [0.0, 0, 10, 22],  # IoU 0.4545 -> ignore
        [0.0, 0, 10, 30],  # IoU 0.333 -> negative
        [98.0, 98, 106, 106],  # IoU 0.25 with gt 1: its best anchor -> low-quality positive
        [300.0, 300, 310, 310],  # nothing -> negative
    ])
    m = B.match_anchors(anchors, gt, pos_iou=0.5, neg_iou=0.4)
    assert m.tolist() == [0, 0, 0, B.IGNORE, B.NEGATIVE, 1, B.NEGATIVE]
    m = B.match_anchors(anchors, gt, low_quality=False)
    assert m[5].item() == B.NEGATIVE
    m = B.match_anchors(anchors, gt, gt_ignore=T([False, True]))
    assert m[5].item() == B.IGNORE and m[0].item() == 0
    assert (B.match_anchors(anchors, torch.zeros(0, 4)) == B.NEGATIVE).all()
    with pytest.raises(ValueError, match="neg_iou"):
        B.match_anchors(anchors, gt, pos_iou=0.3, neg_iou=0.4)


def _nms_reference(boxes, scores, thr):
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    keep = []
    for i in order:
        if all(B.box_iou(boxes[i:i + 1], boxes[j:j + 1]).item() <= thr for j in keep):
            keep.append(i)
    return keep


def test_nms_matches_a_brute_force_reference():
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(120, 2, generator=g) * 60
    boxes = torch.cat([xy, xy + torch.rand(120, 2, generator=g) * 30 + 5], 1)
    scores = torch.rand(120, generator=g)
    for thr in (0.3, 0.5, 0.7):
        assert B.nms(boxes, scores, thr).tolist() == _nms_reference(boxes, scores, thr)
    same = T([[0.0, 0, 10, 10], [0, 0, 10, 10]])
    assert B.nms(same, T([0.9, 0.8]), 0.5).tolist() == [0]
    assert sorted(B.batched_nms(same, T([0.9, 0.8]), T([0, 1]), 0.5).tolist()) == [0, 1]  # other class survives
    assert B.nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0


def test_postprocess_decodes_thresholds_and_clips():
    anchors = T([[10.0, 10, 30, 30], [12.0, 10, 32, 30], [50.0, 50, 70, 70]])
    logits = T([[4.0], [3.0], [-9.0]])
    deltas = torch.zeros(3, 4)
    deltas[0, 2] = np.log(2)  # twice as wide: x from 0 to 40
    boxes, scores, labels = B.postprocess(logits, deltas, anchors, image_size=(64, 35))
    assert len(boxes) == 1  # the second overlaps the first by IoU > 0.5, the third scores 1e-4
    assert boxes[0].tolist() == pytest.approx([0.0, 10, 35, 30])  # clipped to the 35 px width
    assert scores[0].item() == pytest.approx(torch.sigmoid(T(4.0)).item()) and labels.tolist() == [0]


# ----------------------------------------------------------------------------- model
def test_model_outputs_match_anchors_and_components():
    torch.manual_seed(0)
    model = ssd_tiny(num_classes=3).eval()
    x = torch.rand(2, 3, 96, 130)
    cls, box = model(x)
    anchors = model.anchors(96, 130)
    assert cls.shape == (2, anchors.shape[0], 3) and box.shape == (2, anchors.shape[0], 4)
    from visionscale.components import run_components

    state = run_components(model.components(), x)
    torch.testing.assert_close(state["cls_logits"], cls)
    assert [c.name for c in model.components()] == ["backbone", "fpn", "head"]
    # prior probability 0.01 at initialisation
    assert torch.sigmoid(cls).mean().item() == pytest.approx(0.01, rel=0.3)
    # anchors at stride 8 sit on cell centres with side 2 x 8 x octave
    a0 = anchors[4]  # first cell, octave 2^(1/3), ratio 1 (octave-major, ratios 0.5, 1, 2)
    assert ((a0[:2] + a0[2:]) / 2).tolist() == pytest.approx([4.0, 4.0])
    assert (a0[2] - a0[0]).item() == pytest.approx(16 * 2 ** (1 / 3), rel=1e-5)


def test_detectors_are_registered_and_the_model_file_is_pure():
    import visionscale.detection.model  # noqa: F401
    from visionscale.registry import create

    assert isinstance(create("ssd_tiny", num_classes=2, image_size=128), SingleStageDetector)
    code = ("import sys, visionscale.detection.model; "
            "bad = [m for m in sys.modules if m.startswith(('matplotlib', 'typer', 'pycocotools', "
            "'visionscale.detection.train', 'visionscale.detection.plots', 'visionscale.cli'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------- COCO reader
def _coco_file(tmp_path, anns, images=None):
    images = images or [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                        {"id": 2, "file_name": "b.png", "width": 40, "height": 30}]
    doc = {"images": images, "annotations": anns, "categories": [{"id": 7, "name": "face"}, {"id": 3, "name": "cat"}]}
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(doc))
    return p


def test_coco_reader_parses_and_reports_bad_boxes_with_file_and_id(tmp_path):
    p = _coco_file(tmp_path, [
        {"id": 11, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 5]},
        {"id": 12, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 4]},  # zero width
        {"id": 13, "image_id": 2, "category_id": 3, "bbox": [5, 5, 3, -2]},  # negative height
        {"id": 14, "image_id": 2, "category_id": 3, "bbox": [35, 25, 10, 10], "iscrowd": 1},  # clipped
        {"id": 15, "image_id": 9, "category_id": 3, "bbox": [1, 1, 2, 2]},  # unknown image
    ])
    ds = load_coco(p)
    assert ds.class_names == ["cat", "face"] and ds.category_ids == [3, 7]
    r1, r2 = ds.records
    assert r1.boxes.tolist() == [[1, 2, 11, 7]] and r1.labels.tolist() == [1]
    assert r2.boxes.tolist() == [[35, 25, 40, 30]] and r2.ignore.tolist() == [True]
    assert len(ds.problems) == 3
    assert "annotation id 12" in ds.problems[0] and "'a.png'" in ds.problems[0] and str(p) in ds.problems[0]
    assert "zero or negative size" in ds.problems[1] and "annotation id 13" in ds.problems[1]
    assert "unknown image_id 9" in ds.problems[2]
    with pytest.raises(AnnotationError, match=r"annotation id 12 .*zero or negative size"):
        load_coco(p, strict=True)


def test_coco_reader_errors(tmp_path):
    with pytest.raises(AnnotationError, match="not found"):
        load_coco(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AnnotationError, match="not a readable JSON"):
        load_coco(bad)
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(AnnotationError, match="no 'images' list"):
        load_coco(bad)
    p = _coco_file(tmp_path, [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 2]}])
    with pytest.raises(AnnotationError, match=r"annotation id 1 .*bbox must be"):
        load_coco(p)


# ----------------------------------------------------------------------------- WIDER FACE reader
WIDER = """0--Parade/0_Parade_a.jpg
2
10 20 30 40 0 0 0 0 0 0
50 10 0 12 1 0 0 0 0 0
1--Handshaking/1_b.jpg
0
0 0 0 0 0 0 0 0 0 0
2--Demo/2_c.jpg
3
5 5 8 9 0 0 0 1 0 0
30 30 10 10 2 0 0 0 1 0
40 2 -3 6 0 0 0 0 0 0
"""


def test_widerface_reader_with_bad_and_invalid_faces(tmp_path):
    gt = tmp_path / "wider_face_train_bbx_gt.txt"
    gt.write_text(WIDER)
    imgs = tmp_path / "images"
    for name, size in (("0--Parade/0_Parade_a.jpg", (80, 70)), ("1--Handshaking/1_b.jpg", (20, 20)),
                       ("2--Demo/2_c.jpg", (60, 50))):
        (imgs / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size).save(imgs / name)
    ds = load_widerface(gt, imgs)
    assert [r.path.name for r in ds.records] == ["0_Parade_a.jpg", "1_b.jpg", "2_c.jpg"]
    a, b, c = ds.records
    assert (a.width, a.height) == (80, 70) and a.boxes.tolist() == [[10, 20, 40, 60]]
    assert len(b.boxes) == 0  # a face-less image keeps its all-zero line out of the boxes
    assert c.boxes.tolist() == [[5, 5, 13, 14], [30, 30, 40, 40]] and c.ignore.tolist() == [True, False]
    assert len(ds.problems) == 2
    assert f"{gt}:4:" in ds.problems[0] and "0_Parade_a.jpg' face 1" in ds.problems[0] and "w=0" in ds.problems[0]
    assert f"{gt}:12:" in ds.problems[1] and "face 2" in ds.problems[1] and "w=-3" in ds.problems[1]
    with pytest.raises(AnnotationError, match="zero or negative size"):
        load_widerface(gt, imgs, strict=True)
    assert len(load_widerface(gt, tmp_path / "nowhere", read_sizes=False)) == 3
    missing = load_widerface(gt, tmp_path / "nowhere")
    assert len(missing) == 0 and any("cannot be read" in m for m in missing.problems)


def test_widerface_truncated_file(tmp_path):
    gt = tmp_path / "gt.txt"
    gt.write_text("a.jpg\n3\n1 1 5 5 0 0 0 0 0 0\n")
    with pytest.raises(AnnotationError, match="announces 3 faces but the file ends"):
        load_widerface(gt, tmp_path, read_sizes=False)
    gt.write_text("a.jpg\nmany\n")
    with pytest.raises(AnnotationError, match=r"gt.txt:2: expected the number of faces"):
        load_widerface(gt, tmp_path, read_sizes=False)


# ----------------------------------------------------------------------------- demo data, metrics, training
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    make_demo(out, DemoConfig(n_train=24, n_val=8, size=64, min_side=8, seed=3))
    return out


def test_demo_set_is_valid_and_reproducible(demo, tmp_path):
    ds = load_coco(demo / "train.json")
    assert len(ds) == 24 and ds.class_names == ["face"] and not ds.problems
    assert ds.num_boxes >= 24  # at least one face per image
    for r in ds.records:
        assert r.path.is_file() and (r.boxes[:, 2:] <= 64).all() and (r.boxes[:, :2] >= 0).all()
    make_demo(tmp_path, DemoConfig(n_train=24, n_val=8, size=64, min_side=8, seed=3))
    assert (tmp_path / "train.json").read_text() == (demo / "train.json").read_text()
    assert (tmp_path / "images" / "val_00003.png").read_bytes() == (demo / "images" / "val_00003.png").read_bytes()


def test_coco_metrics_by_hand(demo):
    ds = load_coco(demo / "val.json")
    perfect = [{"image_id": r.image_id, "category_id": 1, "score": 1.0,
                "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
               for r in ds.records for b in r.boxes]
    m = coco_metrics(ds, perfect)
    assert m["AP"] == pytest.approx(100.0) and m["AP50"] == pytest.approx(100.0)
    # each box grown to 1.5x its width: IoU 2/3 -> counts at 0.5, not at 0.75
    wide = [dict(d, bbox=[d["bbox"][0], d["bbox"][1], d["bbox"][2] * 1.5, d["bbox"][3]]) for d in perfect]
    m = coco_metrics(ds, wide)
    assert m["AP50"] == pytest.approx(100.0) and m["AP75"] == pytest.approx(0.0)
    none = coco_metrics(ds, [])
    assert none["AP"] == 0.0 and none["AP_L"] is None  # no face in a 64 px image is "large"


def test_loss_without_positives_backpropagates():
    model = ssd_tiny()
    cls, box = model(torch.rand(2, 3, 64, 64))
    anchors = model.anchors(64, 64)
    for loss in ("focal+balanced_l1", "eapm"):
        cfg = TrainConfig(train_ann="unused", loss=loss)
        c, r, n = detection_loss(cfg, cls, box, anchors, [torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.long)] * 2,
                                 [torch.zeros(0, dtype=torch.bool)] * 2)
        assert n == 0 and r.item() == 0 and torch.isfinite(c)
        (c + r).backward(retain_graph=True)


def _cfg(demo, out, **kw):
    base = dict(train_ann=str(demo / "train.json"), val_ann=str(demo / "val.json"), image_size=64, epochs=2,
                batch_size=8, out_dir=str(out), warmup_steps=2)
    base.update(kw)
    return TrainConfig(**base)


def test_train_writes_outputs_and_resume_continues_exactly(demo, tmp_path):
    full = train(_cfg(demo, tmp_path / "full", loss="eapm"))
    for name in ("model.safetensors", "last.safetensors", "metrics.json", "history.json", "loss_curves.png"):
        assert (tmp_path / "full" / name).stat().st_size > 0
    assert set(full.metrics) == {"AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L"}
    assert all(np.isfinite(full.history["loss"])) and len(full.history["loss"]) == 6  # 3 steps x 2 epochs

    part = _cfg(demo, tmp_path / "part", loss="eapm")
    train(part, stop_after=1)
    with pytest.raises(TrainError, match="already holds a checkpoint"):
        train(part)
    with pytest.raises(TrainError, match="settings differ"):
        train(_cfg(demo, tmp_path / "part", loss="eapm", mu=2.0), resume=True)
    resumed = train(part, resume=True)
    assert resumed.history["loss"] == pytest.approx(full.history["loss"])
    a, _ = read_checkpoint(tmp_path / "full" / "model.safetensors")
    b, _ = read_checkpoint(tmp_path / "part" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    model, meta = load_model(tmp_path / "part" / "model.safetensors")
    assert meta["config"]["loss"] == "eapm" and meta["class_names"] == ["face"]
    with pytest.raises(TrainError, match="no checkpoint"):
        train(_cfg(demo, tmp_path / "fresh"), resume=True)


def test_eval_through_a_runner_matches_eager(demo, tmp_path):
    """`detect eval --backend ...` and bench's COCO AP: an ONNX Runtime Runner gives the eager detections."""
    from visionscale.detection.data import ImageCache
    from visionscale.detection.train import evaluate, load_dataset, predict
    from visionscale.runtime import Runner
    from visionscale.deploy.tasks import task_metric

    train(_cfg(demo, tmp_path / "run", epochs=6))
    model, _ = load_model(tmp_path / "run" / "model.safetensors")
    cache = ImageCache(load_dataset(demo / "val.json", None, "coco"), 64)
    eager = predict(model, cache)
    assert len(eager) > 0  # a trained model: the comparison below is not between two empty lists
    with Runner(model, backend="onnxruntime", device="cpu", image_size=64) as ort:
        assert ort.info["provider"] == "CPUExecutionProvider"
        got = predict(model, cache, forward=ort)
        key = lambda d: (d["image_id"], -d["score"])  # noqa: E731
        eager, got = sorted(eager, key=key), sorted(got, key=key)
        assert [d["image_id"] for d in got] == [d["image_id"] for d in eager]
        np.testing.assert_allclose([d["score"] for d in got], [d["score"] for d in eager], atol=1e-4)
        np.testing.assert_allclose([d["bbox"] for d in got], [d["bbox"] for d in eager], atol=0.02)
        metric = task_metric(model, demo, (64, 64))
        assert metric.kind == "detection_ap"
        assert metric.evaluate(ort) == pytest.approx(evaluate(model, cache)["AP"], abs=0.01)

    ckpt = str(tmp_path / "run" / "model.safetensors")
    res = runner.invoke(_app(), ["detect", "eval", ckpt, "--data", str(demo), "--precision", "bf16", "--json"])
    assert res.exit_code == 0, res.output
    assert "running eager bf16 on cpu" in res.stderr and set(json.loads(res.stdout)) >= {"AP", "AP50"}
    if not torch.cuda.is_available():  # no silent fallback to the CPU: a one-line error, exit 2
        res = runner.invoke(_app(), ["detect", "eval", ckpt, "--data", str(demo), "--backend", "tensorrt"])
        assert res.exit_code == 2 and "TensorRT needs a CUDA GPU" in res.output


# ----------------------------------------------------------------------------- CLI
def _app():
    from visionscale.cli import detect

    app = typer.Typer()
    app.add_typer(detect.app, name="detect")

    @app.callback()
    def main():  # keeps "detect" a subcommand even with one group
        pass

    return app


runner = CliRunner()


def test_cli_make_demo_and_compare(tmp_path):
    app = _app()
    data = tmp_path / "demo"
    res = runner.invoke(app, ["detect", "make-demo", str(data), "--train", "16", "--val", "6", "--size", "64"])
    assert res.exit_code == 0, res.output
    assert (data / "train.json").is_file() and "16 train images" in res.output
    res = runner.invoke(app, ["detect", "compare", "--data", str(data), "--epochs", "1", "--image-size", "64",
                              "--batch-size", "8", "--seeds", "0", "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    assert "focal + balanced L1" in res.stdout and "EAPM (mu=1.5, theta=1)" in res.stdout and "AP50" in res.stdout
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["setting"] for r in result["rows"]] == ["baseline", "eapm"]
    assert (tmp_path / "cmp" / "eapm_seed0" / "loss_curves.png").is_file()
    res = runner.invoke(app, ["detect", "eval", str(tmp_path / "cmp" / "eapm_seed0" / "model.safetensors"),
                              "--data", str(data), "--json"])
    assert res.exit_code == 0, res.output
    assert set(json.loads(res.stdout)) == {"AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L", "skipped_annotations"}


def test_cli_plot_eapm(tmp_path):
    res = runner.invoke(_app(), ["detect", "plot-eapm", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    for name in ("fig3_eapm_focal_gradient.png", "fig4_eapm_balanced_l1_gradient.png", "eapm_backward_modes.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size[0] > 400


def test_cli_errors_exit_2(tmp_path, demo):
    app = _app()
    cases = [
        (["detect", "train"], "no training data"),
        (["detect", "train", "--data", str(tmp_path)], "missing train.json"),
        (["detect", "train", "--data", str(demo), "--loss", "l2"], "loss must be one of"),
        (["detect", "train", "--data", str(demo), "--mu", "-1"], "mu must be >= 0"),
        (["detect", "train", "--data", str(demo), "--model", "nope"], "unknown model 'nope'"),
        (["detect", "compare", "--data", str(demo), "--seeds", "a,b"], "--seeds must be comma-separated"),
        (["detect", "train", "--train-ann", str(tmp_path / "x.txt"), "--format", "widerface"], "WIDER FACE needs"),
    ]
    for args, message in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert "error:" in res.output and message in res.output, (args, res.output)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],
                                                "annotations": [{"id": 5, "image_id": 1, "category_id": 1,
                                                                 "bbox": [1, 1, 0, 3]}],
                                                "categories": [{"id": 1, "name": "face"}]}))
    (bad / "val.json").write_text((bad / "train.json").read_text())
    res = runner.invoke(app, ["detect", "train", "--data", str(bad), "--strict"])
    assert res.exit_code == 2 and "annotation id 5" in res.output
