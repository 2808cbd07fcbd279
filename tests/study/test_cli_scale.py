"""`visionscale scale` in-process on tiny models, and its bad-input errors."""

import json

import pytest
from typer.testing import CliRunner

from visionscale.cli.main import app

runner = CliRunner()
TINY = "patchcore_tiny,efficientad_tiny,ddad_tiny"


def scale(*args):
    return runner.invoke(app, ["scale", *args])


def test_scale_on_tiny_models_writes_every_output(tmp_path):
    out = tmp_path / "study"
    res = scale("--models", TINY, "--resolutions", "64,96,128", "--target", "256", "--warmup", "0",
                "--repeats", "1", "--device", "cpu", "--time-budget", "3600", "--out", str(out), "--gpu", "Toy=2GiB")
    assert res.exit_code == 0, res.output
    data = json.loads((out / "results.json").read_text())
    comps = {(r["model"], r["component"]) for r in data["rows"]}
    assert {("patchcore_tiny", "feature_extractor"), ("patchcore_tiny", "nn_search"), ("patchcore_tiny", "postprocess"),
            ("efficientad_tiny", "teacher"), ("efficientad_tiny", "student"), ("efficientad_tiny", "autoencoder"),
            ("ddad_tiny", "denoiser"), ("ddad_tiny", "feature_extractor")} == comps
    denoiser = next(r for r in data["rows"] if r["component"] == "denoiser")
    assert denoiser["repeats"] == 10
    assert all(r["status"] == "ok" and r["time_ms_mean"] > 0 for r in data["rows"])
    # memory grows with resolution for every component that holds activations
    for model, comp in comps:
        sums = [r["activation_sum_bytes"] for r in data["rows"] if (r["model"], r["component"]) == (model, comp)]
        assert sums == sorted(sums) and sums[0] < sums[-1]
    assert {g["gpu"] for g in data["gpu_limits"]} >= {"Toy", "H100 80GB"}
    assert any(f["component"] == "total" and f["metric"] == "total_peak_bytes" for f in data["fits"])
    for name in ("report.md", "rows.csv", "fits.csv", "gpu_limits.csv", "memory_extrapolated.png",
                 "components_ddad_tiny.png", "tile_plans.csv", "tile_plans.png"):
        assert (out / name).stat().st_size > 0
    assert "Largest square resolution" in res.output
    # the second table: the tile that fits and the tiles of a 12 MP image, with where the times come from
    assert "Tile that fits per GPU" in res.output and "12 MP image (3464 px)" in res.output
    assert "times on the CPU that ran the study" in " ".join(res.output.split())
    toy = next(p for p in data["tile_plans"] if p["gpu"] == "Toy" and p["model"] == "ddad_tiny" and p["megapixels"] == 12)
    assert toy["tiles"] > 1 and f"{toy['tile_limit_px']}: " in res.output  # (cells may wrap after this)


def test_json_output_and_no_timing(tmp_path):
    res = scale("--models", "efficientad_tiny", "--resolutions", "64,128,192", "--target", "256", "--no-timing",
                "--no-plots", "--no-exact-limits", "--json", "--out", str(tmp_path / "o"))
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert {r["status"] for r in data["rows"]} == {"analytic"}
    assert data["config"]["dtype"] == "fp32"


def test_fp16_halves_activation_bytes(tmp_path):
    def sums(dtype):
        res = scale("--models", "efficientad_tiny", "--resolutions", "64,128,192", "--no-timing", "--no-plots",
                    "--no-exact-limits", "--dtype", dtype, "--json", "--out", str(tmp_path / dtype))
        assert res.exit_code == 0, res.output
        return [r["activation_sum_bytes"] for r in json.loads(res.stdout)["rows"]]

    assert [2 * b for b in sums("fp16")] == sums("fp32")


def test_dtype_axis_on_the_command_line(tmp_path):
    res = scale("--models", "efficientad_tiny", "--resolutions", "64,128,192", "--target", "256", "--no-timing",
                "--no-plots", "--dtype", "fp32,bf16", "--out", str(tmp_path / "o"), "--gpu", "Toy=1GiB", "--only-gpus")
    assert res.exit_code == 0, res.output
    assert "efficientad_tiny fp32" in res.output and "efficientad_tiny bf16" in res.output  # one column per dtype
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    assert data["config"]["dtypes"] == ["fp32", "bf16"]
    rows = {(r["dtype"], r["component"], r["resolution"]): r["activation_sum_bytes"] for r in data["rows"]}
    assert all(2 * rows[("bf16", c, r)] == b for (d, c, r), b in rows.items() if d == "fp32")
    limits = {g["dtype"]: g["max_resolution_analytic"] for g in data["gpu_limits"]}
    assert limits["bf16"] > limits["fp32"]
    assert {f["dtype"] for f in data["fits"]} == {"fp32", "bf16"}


def test_models_command_lists_tiny_variants():
    res = runner.invoke(app, ["models", "*tiny"])
    assert res.exit_code == 0
    assert {"patchcore_tiny", "efficientad_tiny", "ddad_tiny", "resnet_tiny"} <= set(res.output.split())


@pytest.mark.parametrize(
    "args,message",
    [
        (["--models", "patchcore,nope"], "unknown model 'nope'; known models:"),
        (["--resolutions", "256,0"], "resolution must be positive"),
        (["--resolutions", "256,-5"], "resolution must be positive"),
        (["--resolutions", "256,abc"], "'abc' is not an integer"),
        (["--resolutions", "256.5"], "not an integer"),
        (["--models", "ddad", "--resolutions", "256,500,1024"], "DDAD"),
        (["--models", "efficientad_m", "--resolutions", "128,256,512"], "256"),
        (["--dtype", "fp8"], "dtype must be one of"),
        (["--gpu", "no-size"], "NAME=SIZE"),
        (["--device", "cuda:0"], None),  # no GPU in CI: clear error; with a GPU it would run
    ],
)
def test_bad_input_fails_before_any_work(tmp_path, args, message):
    out = tmp_path / "never"
    res = scale(*args, "--no-timing", "--out", str(out))
    if message is None:  # --device cuda
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA GPU is present: the cuda path is exercised by the study itself")
        message = "'cuda:0' was asked for but"
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file")
    res = scale("--models", "efficientad_tiny", "--resolutions", "64,128,192", "--out", str(blocker / "sub"))
    assert res.exit_code == 2
    assert "exists and is not a folder" in res.output and len(res.output.strip().splitlines()) == 1


def test_user_model_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "usernet.py").write_text(
        "import torch.nn as nn\n"
        "net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())\n"
        "def build(image_size=None):\n    return nn.Conv2d(3, 2, 1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    res = scale("--models", "usernet:net,usernet:build", "--resolutions", "16,32,64", "--target", "128",
                "--no-timing", "--no-plots", "--no-exact-limits", "--json", "--out", str(tmp_path / "o"))
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["rows"]
    assert {r["model"] for r in rows} == {"usernet:net", "usernet:build"}
    conv = next(r for r in rows if r["model"] == "usernet:build" and r["resolution"] == 32)
    assert conv["activation_sum_bytes"] == 2 * 32 * 32 * 4
    bad = scale("--models", "usernet:nothing", "--no-timing", "--out", str(tmp_path / "p"))
    assert bad.exit_code == 2 and "has no attribute 'nothing'" in bad.output
    bad = scale("--models", "no_such_module_xyz:net", "--no-timing", "--out", str(tmp_path / "q"))
    assert bad.exit_code == 2 and "cannot import 'no_such_module_xyz'" in bad.output
