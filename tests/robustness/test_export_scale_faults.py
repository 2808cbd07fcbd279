"""`export` and `scale` against bad outputs, bad options and broken file systems.

Every case ends in one line ``error: ...`` and exit status 2, and destroys nothing: an export
never replaces the checkpoint it reads nor an existing file, a study leaves its folder as it
was when it fails and leaves no stale files when it succeeds. Output problems are found before
the work starts (the model factories below record every call, so "before" is checked).
"""

from __future__ import annotations

import csv
import json
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from fs import read_only_fs, small_fs
from visionscale.cli.main import app
from visionscale.io.outputs import MANIFEST

runner = CliRunner()

NETS = textwrap.dedent('''
    import torch.nn as nn

    CALLS = []  # every model built, so a test can tell whether the work started


    def conv1x1(image_size=None):
        CALLS.append("conv1x1")
        return nn.Conv2d(3, 2, 1)


    def small(image_size=None):
        CALLS.append("small")
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())


    def wide(image_size=None):  # ~150 KB of weights: more than a 64 KiB file system holds
        CALLS.append("wide")
        return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1))
''')


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nets")
    (folder / "vs_fault_nets.py").write_text(NETS)
    sys.path.insert(0, str(folder))
    import vs_fault_nets

    yield vs_fault_nets
    sys.path.remove(str(folder))
    sys.modules.pop("vs_fault_nets", None)


@pytest.fixture()
def calls(nets):
    nets.CALLS.clear()
    return nets.CALLS


def invoke(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res


def one_line_error(res, *fragments):
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


# ------------------------------------------------------------------------------- export
@pytest.fixture()
def classifier_run(tmp_path):
    """A classifier training folder: model.safetensors (config in its header) and config.json."""
    from visionscale.classify.checkpoint import save_classifier
    from visionscale.classify.model import Classifier, ClassifierConfig

    run = tmp_path / "run"
    run.mkdir()
    model = Classifier(ClassifierConfig("resnet_tiny", ("cat", "dog"), image_size=32))
    save_classifier(model, run / "model.safetensors")
    (run / "config.json").write_text(json.dumps(model.config.to_dict()))
    return run


@pytest.mark.parametrize("model,out", [
    ("{run}", "{run}/model.safetensors"),                      # the folder's checkpoint
    ("{run}/model.safetensors", "{run}/model.safetensors"),    # the file itself
    ("{run}", "{run}/config"),                                 # its report would be config.json
])
@pytest.mark.parametrize("overwrite", [False, True])
def test_export_never_replaces_the_checkpoint_it_reads(classifier_run, model, out, overwrite):
    before = {p.name: p.read_bytes() for p in classifier_run.iterdir()}
    args = ["export", model.format(run=classifier_run), "--out", out.format(run=classifier_run)]
    res = invoke(*args, *(["--overwrite"] if overwrite else []))
    one_line_error(res, "is the input", "would destroy the input")
    assert {p.name: p.read_bytes() for p in classifier_run.iterdir()} == before


def test_export_refuses_an_existing_file_unless_overwrite(tmp_path, calls):
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG my holiday")
    one_line_error(invoke("export", "vs_fault_nets:small", "--out", photo), str(photo), "already exists")
    assert photo.read_bytes() == b"\x89PNG my holiday" and calls == []
    # the report beside the model counts as an output too
    report = tmp_path / "m.onnx.json"
    report.write_text("my notes")
    one_line_error(invoke("export", "vs_fault_nets:small", "--out", tmp_path / "m.onnx"), "m.onnx.json", "already exists")
    assert report.read_text() == "my notes" and not (tmp_path / "m.onnx").exists() and calls == []
    res = invoke("export", "vs_fault_nets:small", "--out", tmp_path / "m.onnx", "--image-size", 32, 32, "--overwrite")
    assert res.exit_code == 0, res.output
    assert json.loads(report.read_text())["parity_ok"] and (tmp_path / "m.onnx").stat().st_size > 0


def test_export_into_a_read_only_folder_fails_before_exporting(tmp_path, calls):
    with read_only_fs(tmp_path / "ro") as ro:
        res = invoke("export", "vs_fault_nets:small", "--out", ro / "m.onnx", "--image-size", 32, 32)
        one_line_error(res, str(ro), "not writable")
        assert listing(ro) == []
    assert calls == []  # the model was never built: the check came first


def test_export_where_a_file_blocks_the_folder_fails_before_exporting(tmp_path, calls):
    blocker = tmp_path / "models"
    blocker.write_text("a file, not a folder")
    one_line_error(invoke("export", "vs_fault_nets:small", "--out", blocker / "m.onnx"), "not a folder")
    assert calls == [] and blocker.read_text() == "a file, not a folder"


def test_export_onto_a_full_disk_leaves_neither_file(tmp_path, calls):
    with small_fs(tmp_path / "full", "64k") as full:
        res = invoke("export", "vs_fault_nets:wide", "--out", full / "w.onnx", "--image-size", 16, 16)
        one_line_error(res, "No space left on device", "w.onnx")
        assert listing(full) == []  # no model without its report, no temp file
    assert calls == ["wide"]


# ------------------------------------------------------------------------------- scale
def scale(out, *args):
    return invoke("scale", "--models", "vs_fault_nets:conv1x1", "--resolutions", "16,32,64", "--target", 128,
                  "--no-timing", "--no-plots", "--device", "cpu", "--out", out, *args)


@pytest.mark.parametrize("device,fragment", [
    ("tpu", "'tpu' is not one of"),
    ("cuda:x", "'cuda:x' is not one of"),
    ("cpu:1", "'cpu:1'"),
    ("cuda", "'cuda' was asked for but"),
    ("cuda:7", "'cuda:7' was asked for but"),
])
def test_scale_bad_device_is_one_line(tmp_path, nets, device, fragment):
    if device.startswith("cuda") and device != "cuda:x" and torch.cuda.is_available() \
            and (device == "cuda" or torch.cuda.device_count() > 7):
        pytest.skip("this machine has that GPU")
    out = tmp_path / "o"
    one_line_error(scale(out, "--device", device), fragment)
    assert not out.exists()


@pytest.mark.parametrize("spec,fragment", [
    ("os:getcwd", "calling it returned str"),
    ("os:sep", "is a str, not a torch.nn.Module"),
    ("os:path.join", "cannot be built with arguments"),
])
def test_scale_refuses_what_is_not_a_model(tmp_path, spec, fragment):
    out = tmp_path / "o"
    one_line_error(invoke("scale", "--models", spec, "--no-timing", "--device", "cpu", "--out", out), spec, fragment)
    assert not out.exists()


@pytest.mark.parametrize("args,fragment", [
    (["--time-budget", "-1"], "time_budget_s must be >= 0"),
    (["--time-budget", "nan"], "time_budget_s must be a finite number"),
    (["--resolutions", "16,16,32,64"], "resolutions lists 16 more than once"),
    (["--target", "0"], "target must be >= 1"),
    (["--batch-size", "-2"], "batch_size must be >= 1"),
    (["--repeats", "0"], "repeats must be >= 1"),
    (["--repeats", "-5"], "repeats must be >= 1"),
    (["--warmup", "-1"], "warmup must be >= 0"),
    (["--models", "vs_fault_nets:conv1x1,vs_fault_nets:conv1x1"], "models lists"),
    (["--gpu", "Empty=0GiB", "--only-gpus"], "vram_bytes of GPU 'Empty' must be >= 1"),
    (["--limit-cap", "0"], "limit_cap must be >= 32"),
])
def test_scale_bad_numbers_are_one_line_before_any_work(tmp_path, calls, args, fragment):
    out = tmp_path / "o"
    one_line_error(scale(out, *args), fragment)
    assert calls == [] and not out.exists()


@pytest.mark.parametrize("field,value,fragment", [
    ("time_budget_s", -1.0, "time_budget_s must be >= 0"),
    ("time_budget_s", float("inf"), "time_budget_s must be a finite number"),
    ("resolutions", (256, 256, 512), "resolutions lists 256 more than once"),
    ("target", 0, "target must be >= 1"),
    ("batch_size", -1, "batch_size must be >= 1"),
    ("repeats", 0, "repeats must be >= 1"),
    ("warmup", -3, "warmup must be >= 0"),
    ("limit_step", 0, "limit_step must be >= 1"),
])
def test_study_config_checks_its_fields(field, value, fragment):
    from visionscale.errors import VisionscaleError
    from visionscale.study import StudyConfig, StudyError

    with pytest.raises(StudyError, match=fragment) as info:
        StudyConfig(**{field: value})
    assert isinstance(info.value, VisionscaleError)


def test_a_limit_at_the_search_cap_says_so(tmp_path, nets):
    """A 1x1 conv fits far beyond 16384 px on a 1 TiB card: the limit is reported as '>= 16384'
    (``capped``), never as the number to plan with; a 64 MiB card's limit is exact."""
    out = tmp_path / "o"
    res = invoke("scale", "--models", "vs_fault_nets:conv1x1", "--resolutions", "16,32,64", "--target", 128,
                 "--no-timing", "--no-plots", "--device", "cpu", "--gpu", "Huge=1024GiB", "--gpu", "Toy=64MiB",
                 "--only-gpus", "--cuda-context", "0MiB", "--out", out)
    assert res.exit_code == 0, res.output
    assert ">= 16384" in res.output and "cap of 16384 px" in res.output
    limits = {g["gpu"]: g for g in json.loads((out / "results.json").read_text())["gpu_limits"]}
    assert limits["Huge"]["capped"] is True and limits["Huge"]["max_resolution_analytic"] == 16384
    assert limits["Huge"]["max_resolution"] > 16384  # the fit knows it is more
    assert limits["Toy"]["capped"] is False and 1024 < limits["Toy"]["max_resolution_analytic"] < 16384
    with open(out / "gpu_limits.csv", newline="") as fh:
        rows = {r["gpu"]: r for r in csv.DictReader(fh)}
    assert rows["Huge"]["capped"] == "True" and rows["Toy"]["capped"] == "False"
    report = (out / "report.md").read_text()
    assert "| >= 16384 |" in report and "the search stops at 16384 px" in report
    assert f"| {limits['Toy']['max_resolution_analytic']} |" in report
    # the cap is the user's to move: lowered below the Toy card's limit, that limit is capped too
    res = invoke("scale", "--models", "vs_fault_nets:conv1x1", "--resolutions", "16,32,64", "--target", 128,
                 "--no-timing", "--no-plots", "--device", "cpu", "--gpu", "Toy=64MiB", "--only-gpus",
                 "--cuda-context", "0MiB", "--limit-cap", 512, "--json", "--out", tmp_path / "low")
    (toy,) = json.loads(res.stdout)["gpu_limits"]
    assert toy["capped"] is True and toy["max_resolution_analytic"] == 512


def test_a_rerun_leaves_no_stale_files_and_the_default_folder_needs_no_overwrite(tmp_path, nets, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["scale", "--resolutions", "16,32,64", "--target", 128, "--no-timing", "--device", "cpu",
            "--gpu", "Toy=64MiB", "--only-gpus"]
    first = invoke(*args, "--models", "vs_fault_nets:conv1x1,vs_fault_nets:small")
    assert first.exit_code == 0, first.output
    out = tmp_path / "scale-results"
    assert {"components_vs_fault_nets:small.png", "components_vs_fault_nets:conv1x1.png"} <= set(listing(out))
    second = invoke(*args, "--models", "vs_fault_nets:conv1x1", "--no-plots")  # same folder, no --overwrite
    assert second.exit_code == 0, second.output
    assert not [f for f in listing(out) if f.endswith(".png")]  # the first run's plots are gone
    models = {r["model"] for r in json.loads((out / "results.json").read_text())["rows"]}
    assert models == {"vs_fault_nets:conv1x1"}
    # a folder written before outputs had a manifest is recognised as a study's too
    (out / MANIFEST).unlink()
    assert invoke(*args, "--models", "vs_fault_nets:conv1x1", "--no-plots").exit_code == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_scale_refuses_a_folder_of_other_files_unless_overwrite(tmp_path, calls):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    one_line_error(scale(out), "holds files visionscale did not write", "notes.txt")
    assert listing(out) == ["notes.txt"] and calls == []
    assert scale(out, "--overwrite").exit_code == 0
    assert (out / "notes.txt").read_text() == "my notes" and (out / "results.json").exists()


def test_scale_into_a_read_only_folder_fails_before_the_study(tmp_path, calls):
    with read_only_fs(tmp_path / "ro") as ro:
        one_line_error(scale(ro / "study"), "not writable")
        assert listing(ro) == []
    assert calls == []


def test_scale_where_a_file_blocks_the_folder_fails_before_the_study(tmp_path, calls):
    blocker = tmp_path / "results"
    blocker.write_text("a file")
    one_line_error(scale(blocker / "study"), "not a folder")
    one_line_error(scale(blocker), "not a folder")
    assert calls == [] and blocker.read_text() == "a file"


def test_scale_onto_a_full_disk_keeps_the_previous_results(tmp_path, nets):
    with small_fs(tmp_path / "disk", "64k") as disk:
        out = disk / "study"
        assert scale(out).exit_code == 0  # small: CSVs and JSON fit in 64 KiB
        before = {f: (out / f).read_bytes() for f in listing(out)}
        res = invoke("scale", "--models", "vs_fault_nets:conv1x1,vs_fault_nets:small", "--resolutions", "16,32,64",
                     "--target", 128, "--no-timing", "--device", "cpu", "--out", out)  # plots: ~200 KB
        one_line_error(res, "No space left on device")
        assert {f: (out / f).read_bytes() for f in listing(out)} == before  # the earlier study, intact
        assert listing(disk) == ["study"] + [f"study/{f}" for f in sorted(before)]  # no staging folder left


# ------------------------------------------------------------------------------- bench
def test_bench_out_refuses_a_folder_of_other_files_and_reruns_cleanly(tmp_path, calls):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "bench.md").write_text("my own notes, not a benchmark")
    args = ["bench", "vs_fault_nets:small", "--backend", "eager", "--image-size", 16, 16, "--device", "cpu",
            "--warmup", 0, "--repeats", 1, "--out", out]
    one_line_error(invoke(*args), "holds files visionscale did not write", "bench.md")
    assert (out / "bench.md").read_text() == "my own notes, not a benchmark" and calls == []
    (out / "bench.md").unlink()
    for _ in range(2):  # the second run replaces the first run's files without --overwrite
        res = invoke(*args)
        assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "bench.json", "bench.md"]
