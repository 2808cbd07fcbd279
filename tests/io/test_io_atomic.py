import os

import pytest

import torch

from visionscale.io.atomic import atomic_path, write_atomic
from visionscale.io.weights import save_file_atomic
from visionscale.study.report import OutputError, check_output_dir


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_text("old complete content")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, b"new")
    assert target.read_text() == "old complete content"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_output_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        check_output_dir(f)
    with pytest.raises(OutputError, match="cannot write"):
        check_output_dir(f / "sub")


def test_atomic_files_get_default_permissions_not_tempfiles_private_ones(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.json", b"{}")
        save_file_atomic({"w": torch.zeros(2)}, tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    for name in ("a.json", "b.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_atomic_path_removes_the_temp_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer crashed"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer crashed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]
