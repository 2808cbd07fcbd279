"""Anomaly data: layouts, bad input, preprocessing, and the reproducible demo generator."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from visionscale.anomaly import data as D
from visionscale.anomaly import synthetic as S
from ad_cli import ad_cli as _cli

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")




def _png(path, size=(32, 32), value=128, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3) if mode == "RGB" else (size[1], size[0]), value, np.uint8)
    Image.fromarray(arr).save(path)
    return path


def _mvtec(root, n_train=3, defects=("crack",), with_masks=True):
    for i in range(n_train):
        _png(root / "train" / "good" / f"{i:03d}.png")
    _png(root / "test" / "good" / "000.png")
    for d in defects:
        _png(root / "test" / d / "000.png")
        if with_masks:
            _png(root / "ground_truth" / d / "000_mask.png", mode="L", value=255)
    return root


def _tree_digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------
# Demo data


def test_demo_is_reproducible_and_seed_dependent(tmp_path):
    kw = dict(size=48, categories=["gravel"], num_train=2, num_test_good=1, num_test_defect=1)
    S.make_demo(tmp_path / "a", seed=3, **kw)
    S.make_demo(tmp_path / "b", seed=3, **kw)
    S.make_demo(tmp_path / "c", seed=4, **kw)
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert _tree_digest(tmp_path / "a") != _tree_digest(tmp_path / "c")
    cat = tmp_path / "a" / "gravel"
    assert sorted(p.name for p in (cat / "test").iterdir()) == ["color", "good", "hole", "scratch", "stain"]
    ds = D.load_dataset(cat)
    assert ds.layout == "mvtec" and len(ds.train) == 2 and ds.test_has_labels and ds.test_has_masks
    for s in ds.test:
        img = np.asarray(Image.open(s.path))
        assert img.shape == (48, 48, 3)
        if s.label:
            m = np.asarray(Image.open(s.mask))
            assert m.shape == (48, 48) and set(np.unique(m)) <= {0, 255} and 0 < (m > 0).mean() < 0.5
    assert (tmp_path / "a" / "demo.json").is_file()
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temp folders left


@pytest.mark.parametrize("defect", S.DEFECTS)
def test_demo_masks_are_exactly_the_changed_pixels(defect):
    tex = S._texture("brick")
    for seed in range(4):
        rng = np.random.default_rng(seed)
        good = S._good(tex, rng, 64)
        bad = S._PAINTERS[defect](good, rng)
        changed = np.abs(bad - good).max(axis=2) >= 1
        assert changed.any() and changed.mean() < 0.4
        assert (bad == np.rint(bad)).all() and bad.min() >= 0 and bad.max() <= 255  # survives uint8 exactly
        # Painting only touches pixels in one connected blob or curve (a scratch may touch itself).
        from visionscale.anomaly.metrics import connected_components

        assert 1 <= connected_components(changed)[1] <= 2


def test_make_demo_refuses_to_overwrite_and_bad_arguments(tmp_path):
    kw = dict(size=32, categories=["brick"], num_train=1, num_test_good=1, num_test_defect=1)
    S.make_demo(tmp_path, **kw)
    with pytest.raises(FileExistsError, match="overwrite"):
        S.make_demo(tmp_path, **kw)
    S.make_demo(tmp_path, overwrite=True, **kw)
    with pytest.raises(ValueError, match="unknown categories"):
        S.make_demo(tmp_path / "x", categories=["marble"])
    with pytest.raises(ValueError, match=">= 32"):
        S.make_demo(tmp_path / "y", size=16, categories=["brick"])


def test_make_demo_cli(tmp_path):
    app = _cli()
    args = ["ad", "make-demo", str(tmp_path / "d"), "--size", "32", "--categories", "grass", "--train", "2",
            "--test-good", "1", "--test-defect", "1"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "d" / "grass" / "train" / "good").iterdir())) == 2
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "error:" in res.stderr and "--overwrite" in res.stderr
    res = runner.invoke(app, [*args[:3], "--categories", "marble"])
    assert res.exit_code == 2 and "marble" in res.stderr


# ----------------------------------------------------------------------------------------
# Layouts


def test_mvtec_root_category_and_single_category(tmp_path):
    _mvtec(tmp_path / "bottle")
    for root, cat in ((tmp_path, "bottle"), (tmp_path / "bottle", None), (tmp_path, None)):
        ds = D.load_dataset(root, cat)
        assert ds.category == "bottle" and len(ds.train) == 3 and len(ds.test) == 2
        anomalous = [s for s in ds.test if s.label == 1]
        assert [s.defect for s in anomalous] == ["crack"] and anomalous[0].mask.name == "000_mask.png"
    assert "only one" in D.load_dataset(tmp_path).notes[0]


def test_several_categories_need_category(tmp_path):
    _mvtec(tmp_path / "a")
    _mvtec(tmp_path / "b")
    with pytest.raises(D.DataError, match=r"2 MVTec categories \(a, b\): choose a category"):
        D.load_dataset(tmp_path)
    with pytest.raises(D.DataError, match=r"category 'c' not found .*found: a, b"):
        D.load_dataset(tmp_path, "c")


def test_missing_and_empty_train_folder(tmp_path):
    cat = tmp_path / "cat"
    (cat / "train").mkdir(parents=True)
    with pytest.raises(D.DataError, match="training folder missing: .*train/good"):
        D.load_dataset(cat)
    (cat / "train" / "good").mkdir()
    (cat / "train" / "good" / "notes.txt").write_text("not an image")
    with pytest.raises(D.DataError, match="training folder is empty"):
        D.load_dataset(cat)
    assert D.load_dataset(cat, require_train=False).train == []
    with pytest.raises(D.DataError, match="no anomaly-detection data"):
        D.load_dataset(tmp_path / "cat" / "train" / "good")
    with pytest.raises(D.DataError, match="not found"):
        D.load_dataset(tmp_path / "nowhere")


def test_folder_layout_holdout_and_masks(tmp_path):
    for i in range(10):
        _png(tmp_path / "normal" / f"n{i}.png")
    _png(tmp_path / "abnormal" / "a0.png")
    _png(tmp_path / "abnormal" / "dent" / "a1.png")
    _png(tmp_path / "masks" / "a0_mask.png", mode="L", value=255)
    _png(tmp_path / "masks" / "dent" / "a1.png", mode="L", value=255)
    ds = D.load_dataset(tmp_path, seed=1)
    assert ds.layout == "folder" and len(ds.train) == 8
    assert sum(s.label == 0 for s in ds.test) == 2 and ds.test_has_labels and ds.test_has_masks
    assert {s.defect for s in ds.test if s.label} == {"abnormal", "dent"}
    assert "moved to the test set" in ds.notes[0]
    assert [s.path for s in D.load_dataset(tmp_path, seed=1).train] == [s.path for s in ds.train]  # seeded
    _png(tmp_path / "normal_test" / "t0.png")
    ds2 = D.load_dataset(tmp_path)
    assert len(ds2.train) == 10 and [s.path.name for s in ds2.test if s.label == 0] == ["t0.png"]


def test_test_images_without_masks(tmp_path):
    cat = _mvtec(tmp_path / "c", defects=("crack", "hole"))
    (cat / "ground_truth" / "hole" / "000_mask.png").unlink()
    ds = D.load_dataset(cat)
    assert ds.test_has_labels and not ds.test_has_masks
    assert "1 of 2 anomalous test images have no ground-truth mask" in ds.mask_note()


def test_mask_size_mismatch_names_both_files(tmp_path):
    cat = _mvtec(tmp_path / "c")
    _png(cat / "ground_truth" / "crack" / "000_mask.png", size=(16, 32), mode="L", value=255)
    with pytest.raises(D.DataError, match=r"000_mask.png is 16x32 but its image .*000.png is 32x32"):
        D.load_dataset(cat)


# ----------------------------------------------------------------------------------------
# Reading and preprocessing


def test_corrupt_image_stops_by_default_and_is_listed_with_skip_bad(tmp_path):
    samples = [D.Sample(_png(tmp_path / f"{i}.png"), 0) for i in range(5)]
    bad = tmp_path / "2.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    with pytest.raises(D.DataError, match=r"2\.png.*skip_bad"):
        list(D.iter_batches(samples, 32, 2))
    log = D.ReadLog()
    batches = list(D.iter_batches(samples, 32, 2, skip_bad=True, log=log))
    assert [len(b.samples) for b in batches] == [2, 2]
    assert [p for p, _ in log.bad] == [bad] and "skipped 1 unreadable" in log.bad_note()


def test_mixed_sizes_are_resized_and_reported(tmp_path):
    samples = [D.Sample(_png(tmp_path / "a.png", size=(40, 30)), 0), D.Sample(_png(tmp_path / "b.png", size=(64, 64)), 0),
               D.Sample(_png(tmp_path / "c.png", size=(64, 64)), 0)]
    log = D.ReadLog()
    (batch,) = list(D.iter_batches(samples, (48, 56), 8, log=log))
    assert batch.images.shape == (3, 3, 48, 56)
    note = log.size_note((48, 56))
    assert "2 sizes" in note and "40x30 (1)" in note and "64x64 (2)" in note and "resized to 56x48" in note
    log1 = D.ReadLog()
    list(D.iter_batches(samples[1:], 64, 8, log=log1))
    assert log1.size_note((64, 64)) is None


def test_grayscale_rgba_and_16bit_images_become_rgb_batches(tmp_path):
    _png(tmp_path / "g.png", mode="L", value=10)
    Image.fromarray(np.full((32, 32, 4), 200, np.uint8), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.full((32, 32), 65535, np.uint16)).save(tmp_path / "sixteen.png")
    samples = [D.Sample(tmp_path / n, 0) for n in ("g.png", "rgba.png", "sixteen.png")]
    (batch,) = list(D.iter_batches(samples, 32, 4))
    assert batch.images.shape == (3, 3, 32, 32) and torch.isfinite(batch.images).all()
    white = (1 - torch.tensor(D.IMAGENET_MEAN)) / torch.tensor(D.IMAGENET_STD)
    torch.testing.assert_close(batch.images[2, :, 0, 0], white)  # 16-bit full scale -> white


def test_to_model_input_normalises_with_imagenet_stats():
    mean = np.rint(np.array(D.IMAGENET_MEAN) * 255).astype(np.uint8)
    x = D.to_model_input(np.broadcast_to(mean, (20, 30, 3)).copy(), (10, 12))
    assert x.shape == (3, 10, 12) and x.abs().max() < 0.01  # the mean colour maps to ~0


def test_masks_are_resized_nearest_and_binary(tmp_path):
    m = np.zeros((8, 8), np.uint8)
    m[:4, :4] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    t = D.load_mask(tmp_path / "m.png", 4)
    assert t.dtype == torch.bool and t.tolist() == [[True, True, False, False]] * 2 + [[False] * 4] * 2
