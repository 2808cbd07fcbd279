"""PatchCore with one memory bank per tile position (``tile_bank="per-position"``).

The demo images are 160 px; 128 px tiles with the model's default overlap (80 px, stride
multiple of 8) start at 0 and 32 on both axes: a 2 x 2 grid, 4 positions, each tile a
16 x 16 patch grid.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from visionscale import registry
from visionscale.anomaly.coreset import coreset_size
from visionscale.anomaly.data import DataError, Sample, to_model_input
from visionscale.anomaly.tiles import make_tiling, retile, score_images
from visionscale.errors import InvalidValueError
from visionscale.io.weights import load_state_dict

CPU = torch.device("cpu")
TILE = 128
POSITIONS = 4
PATCHES = (TILE // 8) ** 2  # patch rows per tile (layer2, stride 8)
TRAIN = 6


@pytest.fixture(scope="module")
def demo160(tmp_path_factory):
    from visionscale.anomaly.synthetic import make_demo

    root = tmp_path_factory.mktemp("positions_demo")
    make_demo(root, size=160, categories=["brick"], num_train=TRAIN, num_test_good=2, num_test_defect=1,
              defects=("stain", "hole"))
    return root / "brick"


@pytest.fixture(scope="module")
def fitted(demo160, tmp_path_factory):
    from visionscale.anomaly.train import FitConfig, fit

    out = tmp_path_factory.mktemp("positions_run") / "run"
    res = fit(demo160, out, FitConfig(model="patchcore_tiny", tile=TILE, tile_bank="per-position", device="cpu"))
    return out, res


def _tile_features(model, path, boxes):
    """(P, h*w, D) patch features of each tile of the image at ``path``, as score_images feeds them."""
    arr = np.array(Image.open(path).convert("RGB"))
    tiles = torch.stack([to_model_input(arr[y0:y1, x0:x1], (y1 - y0, x1 - x0)) for y0, x0, y1, x1 in boxes])
    with torch.no_grad():
        emb = model.feature_extractor(tiles)  # (P, D, h, w)
    return emb.flatten(2).transpose(1, 2)


def test_per_position_fit_writes_one_bank_per_position(fitted, demo160):
    from visionscale.anomaly.predict import load_run

    out, res = fitted
    config = json.loads((out / "config.json").read_text())
    assert config["tile_bank"] == "per-position"
    assert config["tile_grid"] == {"image_size": [160, 160], "tile": [TILE, TILE], "ys": [0, 32], "xs": [0, 32],
                                   "positions": POSITIONS}
    state = load_state_dict(out / "model.safetensors")
    offsets = state["nn_search.bank_offsets"]
    assert offsets.dtype == torch.int64 and offsets.shape == (POSITIONS + 1,)
    # coreset_ratio applies per position: each position keeps round(0.1 x its own rows).
    sizes = (offsets[1:] - offsets[:-1]).tolist()
    assert sizes == [coreset_size(TRAIN * PATCHES, 0.1)] * POSITIONS
    assert int(offsets[-1]) == state["nn_search.memory_bank"].shape[0]
    co = res.state["stages"]["coreset"]
    assert co["position_patch_rows"] == [TRAIN * PATCHES] * POSITIONS and co["position_bank_rows"] == sizes
    # Every row of bank p is a patch of a tile at position p: copies, so their distance to the
    # nearest such patch is float rounding (the fit ran tiles in batches of 8, this in 4s),
    # far below the bank's own spread.
    from visionscale.anomaly.runs import RunError

    with pytest.raises(RunError, match="backend eager only"):  # the search picks banks per tile in Python
        load_run(out, "cpu", backend="onnxruntime")
    run = load_run(out, "cpu")
    assert run.tile_bank == "per-position" and len(run.model.tile_grid) == POSITIONS
    model = run.model
    bank = state["nn_search.memory_bank"]
    spread = float(torch.cdist(bank[:50], bank[50:100]).median())
    train = sorted((demo160 / "train" / "good").glob("*.png"))
    feats = torch.stack([_tile_features(model, p, model.tile_grid.boxes) for p in train])  # (imgs, P, h*w, D)
    for p in range(POSITIONS):
        own = feats[:, p].reshape(-1, bank.shape[1])
        # From the differences (cdist's matmul form loses digits to the features' common offset).
        d = torch.linalg.vector_norm(bank[offsets[p]:offsets[p + 1], None] - own[None], dim=2).min(dim=1).values
        assert float(d.max()) <= 1e-4 * spread, p


def test_a_tile_is_scored_only_against_its_positions_bank(demo160, tmp_path):
    """Bank p holds exactly the features of tile p of one image: that image scores ~0 with the
    banks in place. Shift the banks by one position (bank p = features of tile p + 1): the same
    rows, so one shared bank over them still scores ~0, but per position each tile now meets
    only another tile's features and scores far above 0."""
    path = sorted((demo160 / "train" / "good").glob("*.png"))[0]
    torch.manual_seed(0)
    model = registry.create("patchcore_tiny", image_size=(TILE, TILE)).eval()
    tiling = make_tiling(model, TILE)
    grid = tiling.grid(160, 160)
    assert len(grid) == POSITIONS
    feats = _tile_features(model, path, grid.boxes)  # (P, h*w, D)
    offsets = torch.arange(POSITIONS + 1) * PATCHES

    def score(bank, with_offsets):
        model.set_memory_bank(bank, offsets if with_offsets else None)
        model.tile_grid = grid if with_offsets else None
        return next(score_images(model, [Sample(path, 0)], CPU, image_size=(TILE, TILE), tiling=tiling,
                                 batch_size=3))  # a batch of 3 mixes positions within a forward

    own = score(feats.reshape(-1, feats.shape[2]), True)
    shifted_bank = feats.roll(-1, dims=0).reshape(-1, feats.shape[2])
    shifted = score(shifted_bank, True)
    shared = score(shifted_bank, False)
    scale = float(shifted.amap.max())
    assert scale > 0
    # Own features: distances are float rounding of identical computations, 1e-3 of the
    # distances to another tile's features is far above that and far below a real match.
    assert float(own.amap.max()) <= 1e-3 * scale and own.score <= 1e-3 * scale
    assert float(shared.amap.max()) <= 1e-3 * scale
    assert shifted.score > 100 * max(own.score, 1e-12)

    # The same through the search itself: every nearest row lies in its own position's bank.
    model.set_memory_bank(torch.randn(POSITIONS * 40, feats.shape[2]), torch.arange(POSITIONS + 1) * 40)
    emb = feats.transpose(1, 2).reshape(POSITIONS, -1, TILE // 8, TILE // 8)
    model.nn_search.positions = [2, 0, 3, 1]
    _, idx, _ = model.nn_search.search_positions(emb)
    for i, p in enumerate([2, 0, 3, 1]):
        assert int(idx[i].min()) >= 40 * p and int(idx[i].max()) < 40 * (p + 1)
    model.nn_search.positions = None
    with pytest.raises(InvalidValueError, match="per-position memory banks"):
        model.nn_search(emb)  # no positions: refused, not searched in the whole bank


def test_image_of_another_size_or_grid_is_refused(fitted, demo160, tmp_path):
    from visionscale.anomaly.predict import load_run, predict

    out, _ = fitted
    run = load_run(out, "cpu")
    src = sorted((demo160 / "test" / "good").glob("*.png"))[0]
    wide = tmp_path / "wide" / "wide.png"
    wide.parent.mkdir()
    Image.open(src).resize((176, 160)).save(wide)  # 176 x 160 (W x H): a 3 x 2 grid
    with pytest.raises(DataError, match=r"wide\.png is 176x160 px.*fitted on 160x160 px"):
        predict(run, [wide.parent], tmp_path / "pred")
    # An overlap of 112 px (stride 16) adds tiles at 16 px: the banks belong to the fitted places.
    # (32 px would keep the starts 0 and 32 here, since the last tile ends at the border: allowed.)
    with pytest.raises(InvalidValueError, match="tile_overlap") as exc:
        next(score_images(run.model, [Sample(src, 0)], CPU, image_size=run.image_size,
                          tiling=retile(run.model, run.tiling, 112)))
    assert exc.value.fields == ("tile_overlap",)


def test_mixed_size_training_folder_is_refused(demo160, tmp_path):
    from visionscale.anomaly.train import FitConfig, FitError, fit

    data = tmp_path / "plain"
    shutil.copytree(demo160 / "train" / "good", data / "normal")
    odd = sorted((data / "normal").glob("*.png"))[-1]
    Image.open(odd).resize((176, 160)).save(odd)
    cfg = FitConfig(model="patchcore_tiny", tile=TILE, tile_bank="per-position", device="cpu")
    with pytest.raises(FitError, match=rf"{odd.name} is 176x160 px.*pre_resize") as exc:
        fit(data, tmp_path / "run", cfg)
    assert "tile_bank" in exc.value.fields and "pre_resize" in exc.value.fields
    assert not (tmp_path / "run").exists()  # refused before anything was written
    # The remedy the message names: one size for all, then one grid.
    res = fit(data, tmp_path / "resized", FitConfig(model="patchcore_tiny", tile=TILE, tile_bank="per-position",
                                                    pre_resize=(160, 160), device="cpu"))
    assert res.state["stages"]["coreset"]["positions"] == POSITIONS


def test_tile_bank_is_validated():
    from visionscale.anomaly.train import FitConfig, FitError

    with pytest.raises(FitError, match="tiled fit") as exc:
        FitConfig(model="patchcore_tiny", tile_bank="per-position")  # whole images
    assert "tile_bank" in exc.value.fields
    with pytest.raises(FitError, match="PatchCore"):
        FitConfig(model="efficientad_tiny", tile=TILE, tile_bank="per-position")
    with pytest.raises(FitError, match="tile_bank must be one of shared, per-position"):
        FitConfig(model="patchcore_tiny", tile=TILE, tile_bank="diagonal")
    shared = FitConfig(model="patchcore_tiny", tile=TILE)
    assert "tile_bank" not in shared.identity()  # runs fitted before the option keep their identity
    assert FitConfig(model="patchcore_tiny", tile=TILE, tile_bank="per-position").identity()["tile_bank"] == \
        "per-position"


def test_shared_and_per_position_runs_are_different_fits(demo160, tmp_path):
    from visionscale.anomaly.train import FitConfig, FitError, fit

    out = tmp_path / "run"
    res = fit(demo160, out, FitConfig(model="patchcore_tiny", tile=TILE, device="cpu"))
    assert "nn_search.bank_offsets" not in load_state_dict(out / "model.safetensors")
    assert "tile_bank" not in json.loads((out / "config.json").read_text())
    # The shared bank holds the patches of every tile of every image (4 tiles of 16 x 16).
    assert res.state["stages"]["coreset"]["patch_rows"] == TRAIN * POSITIONS * PATCHES
    with pytest.raises(FitError, match="different tile_bank"):
        fit(demo160, out, FitConfig(model="patchcore_tiny", tile=TILE, tile_bank="per-position", device="cpu"))


def test_cli_per_position_fit_predict_eval(demo160, tmp_path):
    from typer.testing import CliRunner

    from ad_cli import ad_cli

    app, runner = ad_cli(), CliRunner()
    base = ["ad", "fit", "--model", "patchcore_tiny", "--data", str(demo160), "--device", "cpu"]
    res = runner.invoke(app, base + ["--out", str(tmp_path / "bad"), "--tile-bank", "per-position"])
    assert res.exit_code == 2 and "tile_bank" in res.output and "--tile-bank" in res.output, res.output
    run = tmp_path / "run"
    res = runner.invoke(app, base + ["--out", str(run), "--tile", str(TILE), "--tile-bank", "per-position", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "config.json").read_text())["tile_bank"] == "per-position"
    res = runner.invoke(app, ["ad", "predict", str(run), str(demo160 / "test" / "good"), "--json", "--device", "cpu",
                              "--raw-maps", "--memory-budget", "48MiB"])
    assert res.exit_code == 0, res.output
    recs = json.loads(res.stdout[res.stdout.index("["):])
    assert len(recs) == 2 and np.load(recs[0]["map_file"]).shape == (160, 160)
    res = runner.invoke(app, ["ad", "eval", str(run), "--data", str(demo160), "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["ad", "predict", str(run), str(demo160 / "test" / "good"), "--device", "cpu",
                              "--tile-overlap", "112"])
    assert res.exit_code == 2 and "tile_overlap" in res.output, res.output


def test_interrupted_per_position_fit_resumes_to_the_same_banks(fitted, demo160, tmp_path, monkeypatch):
    """Stopped during the features, then during the coreset of position 1: each rerun goes on
    where the last stopped (finished positions are not chosen again) and ends with the banks
    of an uninterrupted fit."""
    import visionscale.anomaly.patchcore_fit as PF
    from visionscale.anomaly.train import FitConfig, fit

    class Stop(Exception):
        pass

    def stop_when(stage_name, after):
        def progress(stage, done, total):
            if stage == stage_name and done > after:
                raise Stop
        return progress

    cfg = FitConfig(model="patchcore_tiny", tile=TILE, tile_bank="per-position", device="cpu", batch_size=4)
    out = tmp_path / "cut"
    with pytest.raises(Stop):
        fit(demo160, out, cfg, progress=stop_when("features", 0))
    prog = json.loads((out / "cache" / "progress.json").read_text())
    assert prog["images_done"] == 4 and prog["position_rows"] == [PATCHES] * POSITIONS  # one image's 4 tiles
    per_bank = coreset_size(TRAIN * PATCHES, 0.1)
    messages = []
    with pytest.raises(Stop):
        fit(demo160, out, cfg, progress=stop_when("coreset", per_bank), log=messages.append)
    assert any("resuming feature extraction at image 5 of 24" in m for m in messages)
    assert list(json.loads((out / "cache" / "banks" / "done.json").read_text())) == ["0"]
    chosen = []
    real = PF._select_bank
    monkeypatch.setattr(PF, "_select_bank", lambda rows, emb, *a, **k: chosen.append(emb.parent.name) or
                        real(rows, emb, *a, **k))
    fit(demo160, out, cfg)
    assert chosen == ["1", "2", "3"]  # position 0's bank came from the cache
    a = load_state_dict(fitted[0] / "model.safetensors")
    b = load_state_dict(out / "model.safetensors")
    torch.testing.assert_close(b["nn_search.bank_offsets"], a["nn_search.bank_offsets"], rtol=0, atol=0)
    # Same features in batches of 4 instead of 8: equal up to float rounding of the backbone.
    torch.testing.assert_close(b["nn_search.memory_bank"], a["nn_search.memory_bank"])
