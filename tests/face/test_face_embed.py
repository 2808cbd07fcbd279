"""Face embedder, losses, Siamese training, the verify API and its CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from visionscale.cli._common import CLIGroup
from visionscale.face import api as face_api
from visionscale.face.embedder import (
    EmbedderCheckpointError,
    FaceEmbedder,
    build_embedder,
    load_embedder,
    preprocess,
    save_embedder,
)
from visionscale.face.losses import ContrastiveLoss, TripletLoss, contrastive_loss, triplet_loss
from visionscale.registry import create, list_models


pytestmark = pytest.mark.usefixtures("one_thread")


# -- losses ---------------------------------------------------------------------------------
def test_contrastive_loss_hand_values():
    x1 = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    x2 = torch.tensor([[3.0, 4.0], [3.0, 4.0], [0.6, 0.8]])  # distances 5, 5, 1
    same = torch.tensor([1, 0, 0])
    # Hadsell: same -> D^2 / 2 = 12.5; different at margin 6 -> (6 - 5)^2 / 2 = 0.5; (6 - 1)^2 / 2 = 12.5
    per = contrastive_loss(x1, x2, same, margin=6.0, reduction="none")
    assert torch.allclose(per, torch.tensor([12.5, 0.5, 12.5]), atol=1e-5)
    assert contrastive_loss(x1, x2, same, margin=6.0).item() == pytest.approx(25.5 / 3, abs=1e-5)
    assert contrastive_loss(x1, x2, same, margin=6.0, reduction="sum").item() == pytest.approx(25.5, abs=1e-4)
    # Seed 003's form: the same without the 1/2 factors.
    seed = contrastive_loss(x1, x2, same, margin=6.0, form="seed", reduction="none")
    assert torch.allclose(seed, 2 * per)
    # A different pair beyond the margin costs nothing.
    assert contrastive_loss(x1[:1], x2[:1], torch.tensor([0]), margin=1.0).item() == 0.0
    mod = ContrastiveLoss(margin=6.0, form="seed")
    assert mod(x1, x2, same).item() == pytest.approx(2 * 25.5 / 3, abs=1e-4)


def test_contrastive_seed_form_matches_seed_code():
    # Seed 003's ContrastiveLoss, written out: label 1 = similar, F.pairwise_distance.
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    lab = (torch.rand(16, generator=g) < 0.5).float()
    dist = torch.nn.functional.pairwise_distance(a, b)
    ref = torch.mean(lab * dist.pow(2) + (1 - lab) * torch.clamp(3.0 - dist, min=0.0).pow(2))
    assert contrastive_loss(a, b, lab, margin=3.0, form="seed").item() == pytest.approx(ref.item(), rel=1e-4)


def test_contrastive_gradients():
    x1 = torch.tensor([[1.0, 2.0]], requires_grad=True)
    x2 = torch.tensor([[0.0, 0.0]])
    contrastive_loss(x1, x2, torch.tensor([1])).backward()
    assert torch.allclose(x1.grad, torch.tensor([[1.0, 2.0]]))  # d/dx1 of |x1 - x2|^2 / 2
    # Identical embeddings of a different pair: finite gradient (no sqrt(0) blow-up).
    y = torch.zeros(1, 4, requires_grad=True)
    loss = contrastive_loss(y, torch.zeros(1, 4), torch.tensor([0]), margin=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.5, abs=1e-5)  # D = sqrt(0 + 1e-12)
    assert torch.isfinite(y.grad).all()
    # An empty batch gives 0 and still backpropagates.
    e = torch.zeros(0, 3, requires_grad=True)
    out = contrastive_loss(e, e, torch.zeros(0))
    out.backward()
    assert out.item() == 0.0


def test_triplet_loss_hand_values():
    a = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    p = torch.tensor([[1.0, 0.0], [0.1, 0.0]])
    n = torch.tensor([[0.0, 1.5], [2.0, 0.0]])
    # max(0, 1 - 2.25 + 2) = 0.75; max(0, 0.01 - 4 + 2) = 0
    per = triplet_loss(a, p, n, margin=2.0, reduction="none")
    assert torch.allclose(per, torch.tensor([0.75, 0.0]), atol=1e-6)
    assert TripletLoss(margin=2.0)(a, p, n).item() == pytest.approx(0.375)


def test_loss_input_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="form"):
        contrastive_loss(x, x, torch.zeros(2), form="other")
    with pytest.raises(ValueError, match="margin"):
        contrastive_loss(x, x, torch.zeros(2), margin=0)
    with pytest.raises(ValueError, match="same must be"):
        contrastive_loss(x, x, torch.zeros(3))
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        contrastive_loss(x, torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="reduction"):
        contrastive_loss(x, x, torch.zeros(2), reduction="avg")


# -- embedder -------------------------------------------------------------------------------
def _tiny(**kw) -> FaceEmbedder:
    torch.manual_seed(0)
    return create("face_embedder_tiny", **kw)


def test_registry_names():
    names = list_models("face_embedder_*")
    assert {"face_embedder_resnet18", "face_embedder_resnet50", "face_embedder_tiny", "face_embedder_timm"} <= set(names)
    with pytest.raises(TypeError, match="embeding_dim"):
        create("face_embedder_tiny", embeding_dim=8)  # typos are not silently ignored
    assert create("face_embedder_tiny", embedding_dim=8, image_size=24).config.embedding_dim == 8


def test_embedder_shapes_unit_norm_and_components():
    m = _tiny().eval()
    x = torch.randn(3, 3, 32, 32)
    z = m(x)
    assert z.shape == (3, 32)
    assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)
    from visionscale.components import run_components

    parts = m.components()
    assert [p.name for p in parts][-1] == "projection"
    with torch.no_grad():
        assert torch.allclose(run_components(parts, x)["embedding"], z, atol=1e-6)
    a, b = m.forward_pair(x[:2], x[1:])
    assert torch.allclose(a[1], b[0], atol=1e-6)  # same image through the same weights
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m(torch.zeros(2, 1, 32, 32))


def test_resnet18_embedder_is_512d_at_112():
    torch.manual_seed(0)
    m = create("face_embedder_resnet18").eval()
    assert m.config.image_size == 112 and m.dim == 512
    with torch.no_grad():
        assert m(torch.randn(1, 3, 112, 112)).shape == (1, 512)


def test_freeze_all_but_last_block():
    m = _tiny(freeze="all_but_last")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable, "the head and the last block must train"
    assert all(n.startswith(("backbone.layer4.0.", "head.")) for n in trainable)
    assert any(n.startswith("head.") for n in trainable) and any(n.startswith("backbone.layer4.0.") for n in trainable)
    m.train()
    assert not m.backbone.layer1.training and not m.backbone.bn1.training  # frozen BN keeps its statistics
    assert m.backbone.layer4[0].training
    m.freeze("none")
    assert all(p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match="freeze must be"):
        m.freeze("half")


def test_preprocess_and_embed_numpy_images():
    m = _tiny()
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (50, 40, 3), dtype=np.uint8), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)]
    x = preprocess(imgs, m.config)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    e = m.embed(imgs, batch_size=1)
    assert e.shape == (2, 32) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert np.allclose(m.embed(imgs), e, atol=1e-5)  # batching does not change results (eval mode)
    with pytest.raises(ValueError, match="image 0"):
        preprocess([np.zeros((10, 10), np.uint8)], m.config)
    with pytest.raises(ValueError, match="too small"):
        preprocess([np.zeros((2, 2, 3), np.uint8)], m.config)


def test_checkpoint_roundtrip_and_ids(tmp_path):
    m = _tiny()
    path = save_embedder(m, tmp_path / "emb.safetensors")
    m2 = load_embedder(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(m.eval()(x), m2(x), atol=1e-6)
    assert m2.model_id == m.model_id and m.model_id.startswith("face_embedder_tiny/32d/")
    # Registry names give seeded weights: the same id in every process.
    assert build_embedder("face_embedder_tiny").model_id == build_embedder("face_embedder_tiny").model_id
    assert build_embedder("face_embedder_tiny", seed=1).model_id != build_embedder("face_embedder_tiny").model_id
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(EmbedderCheckpointError, match="could not read"):
        load_embedder(bad)
    with pytest.raises(EmbedderCheckpointError, match="not found"):
        load_embedder(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="not a face embedder"):
        build_embedder("resnet_tiny")


def test_timm_backbone_optional():
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install timm"):
            create("face_embedder_timm", model_name="test_vit")
        return
    m = create("face_embedder_timm", model_name="test_vit", image_size=160, freeze="all_but_last")
    trainable = {n.split(".")[1] for n, p in m.named_parameters() if p.requires_grad and n.startswith("backbone.")}
    assert trainable == {"blocks"}
    assert m(torch.randn(2, 3, 160, 160)).shape == (2, 512)


def test_model_modules_are_pure():
    code = ("import sys, visionscale.face.embedder, visionscale.face.losses, visionscale.face.verification, "
            "visionscale.face.gallery; bad = [m for m in sys.modules if m.startswith(('typer', 'matplotlib', "
            "'visionscale.cli', 'visionscale.face.train'))]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# -- training -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lfw_tree(tmp_path_factory):
    from visionscale.face.lfw import make_synthetic_lfw

    d = tmp_path_factory.mktemp("lfw")
    info = make_synthetic_lfw(d, n_people=12, images_per_person=4, size=40, n_sets=2, per_set=8, dev_pairs=12)
    return d, info


def _cfg(**kw):
    from visionscale.face.train import TrainConfig

    base = dict(model="face_embedder_tiny", image_size=32, epochs=3, batch_size=16, pairs_per_epoch=64, val_pairs=32,
                device="cpu", seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_train_resume_and_early_stop(lfw_tree, tmp_path):
    from visionscale.face.train import TrainError, train

    root = lfw_tree[1]["root"]
    full = train(lfw_tree[0], tmp_path / "full", _cfg(epochs=3))  # the parent of lfw/ works too
    for name in ("model.safetensors", "last.safetensors", "history.json", "history.csv", "curves.png", "config.json"):
        assert (tmp_path / "full" / name).is_file(), name
    h = full.history
    assert [r["epoch"] for r in h] == [1, 2, 3]
    assert h[-1]["train_loss"] < h[0]["train_loss"]  # the Siamese net learns the synthetic identities
    assert 1 <= full.best_epoch <= 3 and full.best_val_loss == min(r["val_loss"] for r in h)
    m = load_embedder(tmp_path / "full")
    assert m.dim == 32 and m.config.name == "face_embedder_tiny"

    # Interrupted after 2 epochs, resumed to 3: the same numbers as the uninterrupted run.
    train(root, tmp_path / "part", _cfg(epochs=2), plots=False)
    res = train(root, tmp_path / "part", _cfg(epochs=3), resume=True, plots=False)
    assert len(res.history) == 3
    for a, b in zip(res.history, h):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)

    with pytest.raises(TrainError, match="already holds"):
        train(root, tmp_path / "part", _cfg(epochs=3))
    with pytest.raises(TrainError, match="margin"):
        train(root, tmp_path / "part", _cfg(epochs=4, margin=2.0), resume=True)
    with pytest.raises(TrainError, match="nothing to resume"):
        train(root, tmp_path / "none", _cfg(), resume=True)

    # Early stopping: frozen backbone (BatchNorm statistics fixed) and a learning rate so
    # small that the validation loss cannot fall after epoch 1 -> stop after epoch 2.
    es = train(root, tmp_path / "es", _cfg(epochs=6, patience=1, lr=1e-12, freeze="backbone"), plots=False)
    assert len(es.history) == 2 and es.best_epoch == 1


def test_train_on_pairs_files_and_triplets(lfw_tree, tmp_path):
    from visionscale.face.train import TrainError, train

    d, info = lfw_tree
    res = train(d, tmp_path / "pairs", _cfg(epochs=1), pairs_file=d / "pairsDevTrain.txt",
                val_pairs_file=d / "pairsDevTest.txt", plots=False)
    assert len(res.history) == 1 and np.isfinite(res.history[0]["val_loss"])
    tri = train(info["root"], tmp_path / "tri", _cfg(epochs=1, loss="triplet", margin=0.2), plots=False)
    assert np.isfinite(tri.history[0]["train_loss"])
    with pytest.raises(TrainError, match="triplet"):
        train(d, tmp_path / "x", _cfg(loss="triplet"), pairs_file=d / "pairsDevTrain.txt")
    bad = tmp_path / "bad_pairs.txt"
    bad.write_text("1\nPerson_A00\t1\t9\nPerson_A00\t1\tPerson_B00\t1\n")
    with pytest.raises(TrainError, match="Person_A00_0009.jpg"):
        train(d, tmp_path / "y", _cfg(), pairs_file=bad)
    assert not (tmp_path / "y").exists()  # nothing written on bad input


# -- API ------------------------------------------------------------------------------------
def _face_image(color, big=(10, 10, 130, 130), small=None):
    img = np.full((160, 200, 3), 128, np.uint8)
    x0, y0, x1, y1 = big
    img[y0:y1, x0:x1] = color
    if small is not None:
        a, b, c, d = small
        img[b:d, a:c] = (0, 0, 255)
    return img


def _det(box, score=0.9):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    kp = np.array([[x0 + .3 * w, y0 + .35 * h], [x0 + .7 * w, y0 + .35 * h], [x0 + .5 * w, y0 + .55 * h],
                   [x0 + .5 * w, y0 + .75 * h], [x0, y0 + .4 * h], [x1, y0 + .4 * h]], np.float32)
    return SimpleNamespace(box=np.array(box, np.float32), score=score, keypoints=kp)


class FakeDetector:
    """Finds the coloured squares _face_image draws (never the grey background)."""

    def __init__(self, boxes_by_mean):
        self.calls = 0
        self.boxes = boxes_by_mean

    def detect(self, images):
        self.calls += 1
        return [[_det(b) for b in self.boxes(img)] for img in images]


def _boxes(img):
    if img.std() == 0:
        return []
    out = [(10, 10, 130, 130)]
    if (img[..., 2] == 255).any():
        out.append((150, 20, 180, 50))
    return out


def test_verify_without_detection(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "a.png")
    m = _tiny()
    res = face_api.verify(a, tmp_path / "a.png", model=m, detector=None)
    assert res.distance == pytest.approx(0.0, abs=1e-5) and res.same
    b = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    res2 = face_api.verify(a, b, model=m, detector=None, threshold=0.0)
    assert res2.distance > 0 and not res2.same
    e = face_api.embed([a, b], model=m, detector=None)
    assert e.shape == (2, 32)
    assert res2.distance == pytest.approx(float(np.linalg.norm(e[0] - e[1])), abs=1e-5)
    from visionscale.io.images import ImageReadError

    with pytest.raises(ImageReadError, match="missing.png"):
        face_api.verify(a, tmp_path / "missing.png", model=m, detector=None)


def test_largest_face_no_face_and_warning(monkeypatch):
    from visionscale.face.api import FaceRecognizer, MultipleFacesWarning, NoFaceError, _square_crop

    # Our own crop, so this test does not depend on the alignment module's details.
    monkeypatch.setattr(FaceRecognizer, "_align", staticmethod(lambda img, det, size: _square_crop(img, det.box, 1.0)))
    det = FakeDetector(_boxes)
    rec = FaceRecognizer(_tiny(), detector=det)
    two = _face_image((255, 0, 0), small=(150, 20, 180, 50))
    with pytest.warns(MultipleFacesWarning, match="2 faces in image 0; using the largest"):
        (crop,) = rec.faces([two])
    assert crop.shape[:2] == (120, 120) and crop[..., 0].mean() > 250 and crop[..., 2].mean() < 5  # the red one
    with pytest.raises(NoFaceError, match="no face found in image 1"):
        rec.embed([two, np.full((64, 64, 3), 128, np.uint8)])
    one = _face_image((255, 0, 0))
    with pytest.warns(MultipleFacesWarning, match="image 1"):
        r = rec.verify(one, two)
    assert r.same and r.distance == pytest.approx(0.0, abs=1e-5)  # same largest face -> same embedding


def _real_detector_or_skip():
    try:
        from visionscale.face.detector import FaceDetector
    except ImportError as exc:
        pytest.skip(f"visionscale.face.detector not importable ({exc})")
    try:
        return FaceDetector(model="front", weights=None, device="cpu")
    except Exception as exc:  # weights unavailable offline etc.
        pytest.skip(f"BlazeFace weights unavailable: {exc}")


def test_verify_with_real_detector():
    det = _real_detector_or_skip()
    from skimage import data

    from visionscale.face.api import FaceRecognizer, NoFaceError

    img = data.astronaut()
    dets = det.detect([img])[0]
    if not dets:
        pytest.skip("the detector finds no face on the astronaut image (weights not loaded?)")
    rec = FaceRecognizer(_tiny(), detector=det)
    r = rec.verify(img, np.ascontiguousarray(img[:, ::-1]))
    assert np.isfinite(r.distance)
    with pytest.raises(NoFaceError):
        rec.verify(img, np.full((256, 256, 3), 127, np.uint8))


# -- CLI ------------------------------------------------------------------------------------
@pytest.fixture()
def cli_app(monkeypatch):
    from visionscale.cli import face_recognition as fr

    def fake_recognizer(model, detect, device, backend="eager", precision="fp32"):
        return face_api.FaceRecognizer(model, detector=FakeDetector(_boxes) if detect else None, device=device,
                                       backend=backend, precision=precision)

    monkeypatch.setattr(fr, "_recognizer", fake_recognizer)
    monkeypatch.setattr(face_api.FaceRecognizer, "_align",
                        staticmethod(lambda img, det, size: face_api._square_crop(img, det.box, 1.0)))
    app = typer.Typer(cls=CLIGroup)  # as the `face` app: its boundary prints library errors
    fr.register(app)
    return app


def test_cli_verify(cli_app, tmp_path):
    from PIL import Image

    Image.fromarray(_face_image((255, 0, 0))).save(tmp_path / "a.png")
    Image.fromarray(_face_image((0, 255, 0))).save(tmp_path / "b.png")
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "empty.png")
    runner = CliRunner()
    r = runner.invoke(cli_app, ["verify", str(tmp_path / "a.png"), str(tmp_path / "a.png"), "-m", "face_embedder_tiny", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["same"] is True and res["distance"] == pytest.approx(0.0, abs=1e-5)
    r = runner.invoke(cli_app, ["verify", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "-m", "face_embedder_tiny",
                                "--threshold", "0"])
    assert r.exit_code == 0 and "different people" in r.stdout
    r = runner.invoke(cli_app, ["verify", str(tmp_path / "a.png"), str(tmp_path / "empty.png"), "-m", "face_embedder_tiny"])
    assert r.exit_code == 2 and "no face found" in r.output and "empty.png" in r.output
    r = runner.invoke(cli_app, ["verify", str(tmp_path / "a.png"), str(tmp_path / "nope.png"), "-m", "face_embedder_tiny"])
    assert r.exit_code == 2 and "nope.png" in r.output
    r = runner.invoke(cli_app, ["verify", str(tmp_path / "a.png"), str(tmp_path / "a.png"), "-m", "no_such_model"])
    assert r.exit_code == 2 and "unknown model" in r.output


def test_cli_train(lfw_tree, tmp_path, cli_app):
    root = lfw_tree[1]["root"]
    r = CliRunner().invoke(cli_app, ["train", str(root), "--out", str(tmp_path / "run"), "-m", "face_embedder_tiny",
                                     "--image-size", "32", "--epochs", "1", "--pairs-per-epoch", "32", "--device", "cpu",
                                     "--no-plots"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "model.safetensors").is_file()
    r = CliRunner().invoke(cli_app, ["train", str(tmp_path / "nothing"), "--out", str(tmp_path / "run2")])
    assert r.exit_code == 2 and "not found" in r.output


def test_recognizer_through_onnx_runtime_gives_the_same_embeddings():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from visionscale.face.api import FaceRecognizer

    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(3)]
    eager = FaceRecognizer("face_embedder_tiny", detector=None, seed=3)
    ort = FaceRecognizer("face_embedder_tiny", detector=None, seed=3, backend="onnxruntime")
    assert ort.runtime == {"backend": "onnxruntime", "precision": "fp32", "device": "cpu", "provider": "CPUExecutionProvider"}
    assert eager.runtime == {"backend": "eager", "precision": "fp32", "device": "cpu"}
    a, b = eager.embed(crops), ort.embed(crops)
    assert a.shape == b.shape == (3, eager.dim)
    np.testing.assert_allclose(b, a, atol=1e-4)
