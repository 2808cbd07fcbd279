import os

import pytest

from visionscale.profiling.report import OutputError, check_output_dir, write_atomic


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
