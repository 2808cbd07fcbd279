"""The classify, detect and face commands leave error reporting to the CLI's one boundary.

Bad input makes the library raise a :class:`~visionscale.errors.VisionscaleError`, which
``CLIGroup`` prints as one line ``error: ...`` (exit 2). The commands catch no built-in
exception types themselves, so a plain ``ValueError`` / ``OSError`` / ``ImportError`` /
``sqlite3.Error`` from inside the library (a bug) is not dressed up as a user error: it keeps
its traceback, ends with the ``bug:`` line asking for a report, and exits 1.

The app is called as the ``visionscale`` script calls it (``app(args=...)``, through
``CLIApp``), in this process.
"""

from __future__ import annotations

import errno
import sqlite3

import numpy as np
import pytest
from PIL import Image

from visionscale.cli.main import app

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(capsys, *args) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``visionscale ARGS``."""
    with pytest.raises(SystemExit) as info:
        app(args=[str(a) for a in args], prog_name="visionscale")
    captured = capsys.readouterr()
    code = info.value.code
    return (0 if code is None else code), captured.out, captured.err


def _user_error(code: int, stderr: str, *needles: str) -> str:
    """Exit 2 and one line ``error: ...`` on stderr (after any notes), naming ``needles``; no traceback."""
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("error: "), stderr
    assert all(ln.startswith(("note: ", "warning: ")) for ln in lines[:-1]), stderr
    assert "Traceback" not in stderr and "bug:" not in stderr, stderr
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def _bug(code: int, stderr: str, exc: BaseException) -> None:
    """Exit 1, the traceback of ``exc`` and the report line; never ``error: ...``."""
    assert code == 1, stderr
    assert "Traceback (most recent call last)" in stderr, stderr
    assert f"{type(exc).__name__}: " in stderr and "boom" in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("bug: this is a bug in visionscale ") and "please report it" in last, stderr
    assert "error:" not in stderr, stderr


def _raiser(exc: BaseException):
    def boom(*args, **kwargs):
        raise exc

    return boom


@pytest.fixture()
def image(tmp_path):
    path = tmp_path / "face.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
    return path


# ---------------------------------------------------------------- classify


def test_classify_user_errors_are_one_line(capsys, tmp_path, image):
    _user_error(*_run(capsys, "classify", "predict", tmp_path / "none.safetensors", image)[::2],
                "checkpoint not found", "none.safetensors")
    _user_error(*_run(capsys, "classify", "conv", 32, "3x")[::2], "bad layer spec '3x'")
    _user_error(*_run(capsys, "classify", "conv", 4, "9")[::2], "does not fit an input of 4 px")


@pytest.mark.parametrize("exc", [ValueError("boom"), OSError(errno.EIO, "boom")], ids=["ValueError", "OSError"])
def test_classify_predict_reports_an_internal_error_as_a_bug(capsys, monkeypatch, tmp_path, image, exc):
    import visionscale.classify.train as classify_train

    monkeypatch.setattr(classify_train, "predict", _raiser(exc))
    code, _, stderr = _run(capsys, "classify", "predict", tmp_path / "model.safetensors", image)
    _bug(code, stderr, exc)


def test_classify_conv_reports_an_internal_error_as_a_bug(capsys, monkeypatch):
    import visionscale.classify.convarith as convarith

    exc = ValueError("boom")
    monkeypatch.setattr(convarith, "receptive_fields", _raiser(exc))
    _bug(*_run(capsys, "classify", "conv", 32, "3p1")[::2], exc)


# ---------------------------------------------------------------- detect


def test_detect_user_errors_are_one_line(capsys, tmp_path):
    _user_error(*_run(capsys, "detect", "eval", tmp_path / "none.safetensors", "--ann", tmp_path / "a.json")[::2],
                "checkpoint not found")
    _user_error(*_run(capsys, "detect", "train", "--train-ann", tmp_path / "none.json", "--out", tmp_path / "r")[::2],
                "annotation file not found", "none.json")
    line = _user_error(*_run(capsys, "detect", "train", "--train-ann", tmp_path / "a.json", "--format", "yolo",
                             "--out", tmp_path / "r")[::2], "data_format must be 'coco' or 'widerface'")
    assert line.endswith("got 'yolo' (--format)")  # the library's field, the command's flag


@pytest.mark.parametrize("exc", [ValueError("boom"), KeyError("boom")], ids=["ValueError", "KeyError"])
def test_detect_eval_reports_an_internal_error_as_a_bug(capsys, monkeypatch, tmp_path, exc):
    import visionscale.detection.train as detection_train

    monkeypatch.setattr(detection_train, "load_model", _raiser(exc))
    code, _, stderr = _run(capsys, "detect", "eval", tmp_path / "model.safetensors", "--ann", tmp_path / "a.json",
                           "--device", "cpu")
    _bug(code, stderr, exc)


def test_detect_train_reports_an_internal_error_as_a_bug(capsys, monkeypatch, tmp_path):
    import visionscale.detection.train as detection_train

    exc = ValueError("boom")
    monkeypatch.setattr(detection_train, "load_dataset", _raiser(exc))
    code, _, stderr = _run(capsys, "detect", "train", "--train-ann", tmp_path / "a.json", "--out", tmp_path / "r")
    _bug(code, stderr, exc)


# ---------------------------------------------------------------- face detect


def test_face_detect_user_errors_are_one_line(capsys, tmp_path, image):
    _user_error(*_run(capsys, "face", "detect", tmp_path / "none.png")[::2], "input not found", "none.png")
    line = _user_error(*_run(capsys, "face", "detect", image, "--model", "sideways")[::2],
                       "unknown BlazeFace model 'sideways'")
    assert line.endswith("(--model)")
    _user_error(*_run(capsys, "face", "detect", image, "--model", "tiny", "--weights", tmp_path / "none.tflite")[::2],
                "BlazeFace weights not found")


def test_face_detect_reports_an_internal_error_as_a_bug(capsys, monkeypatch, image):
    import visionscale.face.detector as detector

    exc = ValueError("boom")
    monkeypatch.setattr(detector, "FaceDetector", _raiser(exc))
    _bug(*_run(capsys, "face", "detect", image)[::2], exc)


# ---------------------------------------------------------------- face recognition


def _damaged_gallery(path):
    """A gallery whose SQLite header is intact but whose table pages are garbage."""
    from visionscale.face.gallery import Gallery

    with Gallery(path, model="m") as g:
        g.enroll("ann", embeddings=np.ones((2, 8), np.float32))
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[page:] = bytes(len(data) - page)  # every page but the first (the schema) zeroed
    path.write_bytes(bytes(data))


def test_face_recognition_user_errors_are_one_line(capsys, tmp_path, image):
    db = tmp_path / "gallery.db"
    _damaged_gallery(db)
    _user_error(*_run(capsys, "face", "gallery", "list", "-g", db)[::2], f"gallery {db}: ")
    _user_error(*_run(capsys, "face", "gallery", "remove", "ann", "-g", db)[::2], f"gallery {db}: ")
    notdb = tmp_path / "notes.db"
    notdb.write_text("my notes, not a database\n" * 20)
    _user_error(*_run(capsys, "face", "gallery", "list", "-g", notdb)[::2], "not an SQLite database")
    _user_error(*_run(capsys, "face", "verify", image, tmp_path / "none.png", "-m", "face_embedder_tiny",
                      "--no-detect", "--device", "cpu")[::2], "image not found")
    # Numbers the synthetic-LFW writer cannot use: named, not an OverflowError or numpy's message.
    _user_error(*_run(capsys, "face", "make-lfw-demo", tmp_path / "lfw", "--size", 0)[::2],
                "size must be >= 8, got 0 (--size)")
    _user_error(*_run(capsys, "face", "make-lfw-demo", tmp_path / "lfw", "--seed", -1)[::2],
                "seed must be >= 0, got -1 (--seed)")


@pytest.mark.parametrize("exc", [ValueError("boom"), OSError(errno.EIO, "boom"), ImportError("boom"),
                                 sqlite3.OperationalError("boom")],
                         ids=["ValueError", "OSError", "ImportError", "sqlite3.Error"])
def test_face_recognition_reports_an_internal_error_as_a_bug(capsys, monkeypatch, tmp_path, exc):
    import visionscale.face.lfw as lfw

    monkeypatch.setattr(lfw, "make_synthetic_lfw", _raiser(exc))
    _bug(*_run(capsys, "face", "make-lfw-demo", tmp_path / "lfw")[::2], exc)


def test_face_gallery_reports_an_internal_error_as_a_bug(capsys, monkeypatch, tmp_path):
    from visionscale.face.gallery import Gallery

    db = tmp_path / "gallery.db"
    with Gallery(db, model="m") as g:
        g.enroll("ann", embeddings=np.ones((1, 8), np.float32))
    exc = ValueError("boom")
    monkeypatch.setattr(Gallery, "list", _raiser(exc))
    _bug(*_run(capsys, "face", "gallery", "list", "-g", db)[::2], exc)


# ---------------------------------------------------------------- no broad catches left


def test_these_commands_catch_no_built_in_errors_of_the_library():
    """The only built-in exception these CLI modules catch is the ``int()`` of ``--seeds``, a
    string the CLI parses itself: everything else reaches the boundary as it was raised."""
    import ast
    from pathlib import Path

    import visionscale.cli

    cli = Path(visionscale.cli.__file__).parent
    caught = []
    for name in ("classify.py", "detect.py", "face.py", "face_recognition.py"):
        for node in ast.walk(ast.parse((cli / name).read_text())):
            if isinstance(node, ast.ExceptHandler):
                types = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
                caught += [(name, ast.unparse(t) if t is not None else "bare") for t in types]
    assert caught == [("detect.py", "ValueError")]
