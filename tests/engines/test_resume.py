"""The resumable output folder and the Ray engine's argument checks (no Ray instance needed)."""

from __future__ import annotations

import json

import pytest

from visionscale.engines.resume import ResumableOutput
from visionscale.errors import InvalidValueError, OutputExistsError, RunLockedError


class Stop(Exception):
    pass


def _interrupted(target, fingerprint, done: int):
    job = ResumableOutput(target, kind="ad-predict", fingerprint=fingerprint)
    with pytest.raises(Stop), job:
        for i in range(done):
            job.write_file(f"{i}_mask.png", b"m%d" % i)
            job.mark_done(i, {"record": {"i": i}})
        job.write_file(f"{done}_mask.png", b"half")  # files written, marker not: redone later
        raise Stop
    return job


def test_resume_keeps_finished_items_and_publishes_once(tmp_path):
    target = tmp_path / "out"
    _interrupted(target, {"images": ["a", "b", "c"]}, done=2)
    assert not target.exists()  # nothing published
    job = ResumableOutput(target, kind="ad-predict", fingerprint={"images": ["a", "b", "c"]})
    with job:
        assert job.resumed == 2 and not job.discarded
        assert job.finished() == {0: {"record": {"i": 0}}, 1: {"record": {"i": 1}}}
        job.write_file("2_mask.png", b"m2")
        job.mark_done(2, {"record": {"i": 2}})
        job.write_file("predictions.json", b"[]")
    assert sorted(p.name for p in target.iterdir()) == [".visionscale-output.json", "0_mask.png", "1_mask.png",
                                                        "2_mask.png", "predictions.json"]
    assert (target / "2_mask.png").read_bytes() == b"m2"
    assert json.loads((target / ".visionscale-output.json").read_text())["kind"] == "ad-predict"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the state folder is gone


def test_other_arguments_discard_the_old_state(tmp_path):
    target = tmp_path / "out"
    _interrupted(target, {"threshold": 0.5}, done=2)
    job = ResumableOutput(target, kind="ad-predict", fingerprint={"threshold": 0.6})
    with job:
        assert job.discarded and job.resumed == 0 and job.finished() == {}
        assert list(job.files.iterdir()) == []


def test_an_unreadable_marker_counts_as_not_done(tmp_path):
    target = tmp_path / "out"
    job = _interrupted(target, {"x": 1}, done=2)
    (job.done_dir / "000000001.json").write_text("{trunc")
    with ResumableOutput(target, kind="ad-predict", fingerprint={"x": 1}) as again:
        assert set(again.finished()) == {0}
        again.write_file("predictions.json", b"[]")


def test_refuses_user_files_and_a_second_process(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(OutputExistsError):
        ResumableOutput(mine, kind="ad-predict", fingerprint={})
    job = ResumableOutput(tmp_path / "out", kind="ad-predict", fingerprint={})
    with job:
        with pytest.raises(RunLockedError):
            ResumableOutput(tmp_path / "out", kind="ad-predict", fingerprint={}).__enter__()
        with pytest.raises(ValueError):
            job.write_file("../escape.png", b"x")
        job.write_file("predictions.json", b"[]")
    assert (mine / "notes.txt").read_text() == "keep"


def test_ray_options_and_address_are_checked_before_any_work():
    from visionscale.engines.ray_engine import EngineError, RayOptions, _probe

    with pytest.raises(InvalidValueError):
        RayOptions(workers=0)
    with pytest.raises(InvalidValueError):
        RayOptions(cpus_per_worker=0)
    with pytest.raises(InvalidValueError, match="HOST:PORT"):
        _probe("no-port-here")
    # Port 1 on this machine: nobody listens; refused at once instead of Ray's minutes of retries.
    with pytest.raises(EngineError, match="cannot reach"):
        _probe("127.0.0.1:1", timeout=2)
