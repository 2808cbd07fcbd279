"""The output mechanisms every command uses: nothing the user owns is overwritten, a failed
command leaves nothing half-written, two writers never interleave, a full or read-only disk is
one clear error."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fs import read_only_fs, small_fs
from visionscale.errors import (OutputError, OutputExistsError, RunLockedError, SameAsInputError,
                                VisionscaleError)
from visionscale.io.atomic import write_atomic
from visionscale.io.outputs import MANIFEST, OutputDir, RunLock, check_output_file


def test_output_file_that_is_an_input_is_refused_even_with_overwrite(tmp_path):
    ckpt = tmp_path / "run" / "model.safetensors"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights")
    for overwrite in (False, True):
        with pytest.raises(SameAsInputError, match="is the input"):
            check_output_file(tmp_path / "run" / ".." / "run" / "model.safetensors", inputs=[ckpt], overwrite=overwrite)
    link = tmp_path / "alias.safetensors"
    link.symlink_to(ckpt)
    with pytest.raises(SameAsInputError):
        check_output_file(link, inputs=[ckpt], overwrite=True)
    assert ckpt.read_bytes() == b"weights"


def test_existing_output_file_needs_overwrite(tmp_path):
    png = tmp_path / "photo.png"
    png.write_bytes(b"user's picture")
    with pytest.raises(OutputExistsError, match="already exists"):
        check_output_file(png)
    assert check_output_file(png, overwrite=True) == png
    assert check_output_file(tmp_path / "new" / "deeper" / "x.onnx") == tmp_path / "new" / "deeper" / "x.onnx"


def test_output_file_under_a_regular_file_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "notafolder"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="is not a folder"):
        check_output_file(blocker / "model.onnx")
    with pytest.raises(OutputError, match="is a folder"):
        check_output_file(tmp_path)


def test_output_dir_refuses_foreign_files_and_keeps_them(tmp_path):
    target = tmp_path / "results"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="notes.txt"):
        OutputDir(target, kind="scale")
    with OutputDir(target, kind="scale", overwrite=True) as tmp:
        (tmp / "results.json").write_text("{}")
    assert (target / "notes.txt").read_text() == "mine"  # overwrite replaces same-named files only
    assert (target / "results.json").exists()


def test_output_dir_rerun_removes_stale_files_of_its_own_kind(tmp_path):
    target = tmp_path / "results"
    with OutputDir(target, kind="scale") as tmp:
        (tmp / "a.png").write_text("1")
        (tmp / "plots").mkdir()
        (tmp / "plots" / "old.png").write_text("1")
    assert json.loads((target / MANIFEST).read_text())["files"] == ["a.png", "plots/old.png"]
    with OutputDir(target, kind="scale") as tmp:  # no overwrite needed: every file is ours
        (tmp / "b.png").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == sorted([MANIFEST, "b.png"])
    with pytest.raises(OutputExistsError):  # another command's output is foreign to this one
        OutputDir(target, kind="ad-predict")


def test_output_dir_failure_leaves_the_old_folder_and_no_partial_one(tmp_path):
    target = tmp_path / "results"
    with OutputDir(target, kind="scale") as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with OutputDir(target, kind="scale") as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results"]  # no .results.*.partial left
    with pytest.raises(KeyboardInterrupt):
        with OutputDir(tmp_path / "fresh", kind="scale") as tmp:
            (tmp / "a.txt").write_text("half")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["results"]


def test_run_lock_excludes_a_second_process_and_dies_with_its_owner(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from visionscale.io.outputs import RunLock
        lock = RunLock({str(run)!r}).acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            RunLock(run).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(run):  # kill -9 released it: the kernel drops the flock with the process
        pass


def test_atomic_write_killed_midway_leaves_the_old_file(tmp_path):
    """kill -9 while a large file is being written: the old content stays, readable."""
    target = tmp_path / "gallery.bin"
    target.write_bytes(b"old" * 1000)
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from visionscale.io.atomic import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            with open(tmp, "wb") as fh:
                print("writing", flush=True)
                while True:
                    fh.write(b"new" * 100000)
    """)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert target.read_bytes() == b"old" * 1000


def test_a_full_disk_is_an_error_and_leaves_no_partial_output(tmp_path):
    with small_fs(tmp_path / "small", "64k") as small:
        (small / "keep.json").write_text("{}")
        with pytest.raises(OSError) as info:
            write_atomic(small / "keep.json", b"x" * 200_000)
        assert info.value.errno == 28  # ENOSPC
        assert (small / "keep.json").read_text() == "{}"
        with pytest.raises(OSError):
            with OutputDir(small / "out", kind="scale") as tmp:
                (tmp / "big.bin").write_bytes(b"x" * 200_000)
        assert sorted(p.name for p in small.iterdir()) == ["keep.json"]


def test_a_read_only_folder_is_refused_before_any_work(tmp_path):
    with read_only_fs(tmp_path / "ro", {"in.png": b"data"}) as ro:
        with pytest.raises(OutputError, match="not writable"):
            check_output_file(ro / "model.onnx")
        with pytest.raises(OutputError, match="not writable"):
            OutputDir(ro / "results", kind="scale")


def test_every_library_error_has_the_one_root():
    import visionscale.anomaly.data, visionscale.anomaly.predict, visionscale.anomaly.train  # noqa: E401,F401
    import visionscale.classify.checkpoint, visionscale.classify.data, visionscale.classify.inspect  # noqa: E401,F401
    import visionscale.classify.train, visionscale.detection.data, visionscale.detection.train  # noqa: E401,F401
    import visionscale.face.api, visionscale.face.embedder, visionscale.face.gallery, visionscale.face.lfw  # noqa: E401,F401
    import visionscale.face.tflite_import, visionscale.face.train, visionscale.io.images, visionscale.io.weights  # noqa: E401,F401
    import visionscale.study.report, visionscale.study.sweep, visionscale.registry, visionscale.runtime  # noqa: E401,F401
    import visionscale.anomaly.ddad_train  # noqa: F401 - imported for its error classes

    def walk(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from walk(sub)

    ours = {c for base in (ValueError, RuntimeError, OSError, KeyError) for c in walk(base)
            if c.__module__.startswith("visionscale.") and not c.__name__.startswith("_")}  # private: never escapes
    assert len(ours) >= 25
    orphans = sorted(f"{c.__module__}.{c.__name__}" for c in ours if not issubclass(c, VisionscaleError))
    assert orphans == []
