"""One vocabulary across the CLI: shared option types, one precision table, levelled notes, bugs vs bad input."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
import typer
from typer.main import get_command
from typer.testing import CliRunner

from visionscale.cli import _options
from visionscale.cli._common import CLIGroup, set_verbosity
from visionscale.cli.main import app
from visionscale.errors import InvalidValueError
from visionscale.runtime.precision import (
    PRECISIONS,
    PrecisionError,
    bytes_per_element,
    parse_precision,
    parse_precisions,
    torch_dtype,
)

runner = CliRunner()


def _commands(cmd, path=()):
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _commands(sub, path + (name,))
    if not hasattr(cmd, "commands"):
        yield path, cmd


def test_every_command_shares_one_default_for_device_backend_and_precision():
    seen = {"device": 0, "backend": 0, "precision": 0}
    for path, cmd in _commands(get_command(app)):
        for p in cmd.params:
            if p.name == "device":
                assert p.default == _options.DEFAULT_DEVICE == "auto", path
            elif p.name == "precision":
                assert p.default == _options.DEFAULT_PRECISION, path
            elif p.name == "backend" and path != ("bench",):  # bench compares a list of backends
                # face detect: "auto" = FaceDetector's default, ONNX Runtime on a CPU (issue 14)
                assert p.default == ("auto" if path == ("face", "detect") else _options.DEFAULT_BACKEND), path
            else:
                continue
            seen[p.name] += 1
    assert seen["device"] >= 14 and seen["backend"] >= 10 and seen["precision"] >= 12, seen


def test_one_precision_table():
    from visionscale.study import sweep

    assert sweep.DTYPES is PRECISIONS
    assert [parse_precision(n) for n in ("FP16", "half", "float32", "bfloat16")] == ["fp16", "fp16", "fp32", "bf16"]
    assert parse_precisions("fp32, half,fp16,bf16") == ("fp32", "fp16", "bf16")
    assert torch_dtype("half") is torch.float16 and bytes_per_element("bf16") == 2 and bytes_per_element("fp32") == 4
    with pytest.raises(PrecisionError, match="dtype must be one of fp32, fp16, bf16, got 'fp8'"):
        parse_precisions(["fp32", "fp8"], field="dtype")
    assert sweep.StudyConfig(dtype="half,fp32").dtypes == ("fp16", "fp32")


SCALE = ["scale", "--models", "efficientad_tiny", "--resolutions", "64,96,128", "--no-timing", "--no-plots",
         "--no-exact-limits", "--gpu", "Toy=1GiB", "--only-gpus", "--json"]


def test_scale_takes_precision_and_the_old_dtype_with_a_deprecation_note(tmp_path):
    import json

    res = runner.invoke(app, [*SCALE, "--precision", "fp32,half", "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["config"]["dtypes"] == ["fp32", "fp16"]
    assert "deprecated" not in res.stderr
    res = runner.invoke(app, [*SCALE, "--dtype", "bf16", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["config"]["dtype"] == "bf16"
    assert "warning: --dtype is deprecated and will be removed; use --precision" in res.stderr
    assert "--dtype" not in runner.invoke(app, ["scale", "--help"]).stdout  # hidden
    res = runner.invoke(app, [*SCALE, "--dtype", "bf16", "--precision", "fp16", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "give one of them" in res.stderr


def _toy_app() -> typer.Typer:
    toy = typer.Typer(cls=CLIGroup)

    @toy.command()
    def talk() -> None:
        log = logging.getLogger("visionscale.toy")
        log.debug("details")
        log.info("fitted 3 [images]")
        log.warning("running on random weights")

    @toy.command()
    def refuse(skip_bad: bool = typer.Option(False, "--skip-bad")) -> None:
        raise InvalidValueError("bad.png cannot be read; set skip_bad to leave it out").about("skip_bad", "unknown")

    return toy


def test_library_log_records_become_notes_and_warnings_by_level():
    set_verbosity()
    res = runner.invoke(_toy_app(), ["talk"])
    assert res.exit_code == 0
    assert res.stderr.splitlines() == ["note: fitted 3 [images]", "warning: running on random weights"]
    set_verbosity(quiet=True)
    try:
        assert runner.invoke(_toy_app(), ["talk"]).stderr.splitlines() == ["warning: running on random weights"]
        set_verbosity(verbose=True)
        assert runner.invoke(_toy_app(), ["talk"]).stderr.splitlines()[0] == "note: details"
    finally:
        set_verbosity()


def test_root_quiet_flag_is_accepted():
    res = runner.invoke(app, ["-q", "models", "resnet18"])
    assert res.exit_code == 0 and res.stdout.split() == ["resnet18"]


def test_a_library_error_names_the_commands_flag_for_its_field():
    res = runner.invoke(_toy_app(), ["refuse"])
    assert res.exit_code == 2
    assert res.stderr.strip() == "error: bad.png cannot be read; set skip_bad to leave it out (--skip-bad)"


def test_ad_fit_errors_name_fields_in_the_library_and_flags_in_the_cli(tmp_path):
    from visionscale.anomaly.config import FitConfig, FitError

    # The library speaks of its fields ...
    with pytest.raises(FitError, match="^teacher and distill_teacher exclude each other") as info:
        FitConfig(model="efficientad_tiny", teacher="t.pth", distill_teacher=True, imagenet=str(tmp_path))
    assert "--" not in str(info.value) and info.value.fields == ("teacher", "distill_teacher")
    # ... and `ad fit` adds its flags for them (FitConfig fails before any data is read).
    res = runner.invoke(app, ["ad", "fit", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                              "--model", "efficientad_tiny", "--teacher", "t.pth", "--distill-teacher",
                              "--imagenet", str(tmp_path)])
    assert res.exit_code == 2
    line = res.stderr.strip()
    assert line.startswith("error: teacher and distill_teacher exclude each other")
    assert line.endswith("(--teacher, --distill-teacher)") and len(line.splitlines()) == 1
    # A field spelt like its flag maps to it although the CLI parameter has another name (run_dir).
    res = runner.invoke(app, ["ad", "fit", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                              "--checkpoint-every", "0"])
    assert res.exit_code == 2 and res.stderr.strip().endswith("(--checkpoint-every)")


def test_an_internal_error_is_a_bug_not_a_one_line_user_error(monkeypatch):
    import visionscale.registry as registry

    def broken(pattern="*"):
        raise KeyError("internal table entry")

    monkeypatch.setattr(registry, "list_models", broken)
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 1
    assert isinstance(res.exception, KeyError)  # not turned into "error: ..." and exit 2
    assert "error:" not in res.output


def test_a_bug_shows_its_traceback_and_asks_for_a_report():
    code = ("import sys, visionscale.registry as r\n"
            "def broken(pattern='*'): raise KeyError('internal table entry')\n"
            "r.list_models = broken\n"
            "from visionscale.cli.main import app\n"
            "sys.argv = ['visionscale', 'models']\n"
            "app()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "KeyError: 'internal table entry'" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("bug: this is a bug in visionscale ") and "please report it with the traceback above" in last
    assert "error:" not in proc.stderr
