"""Faults and bad input in the face pipeline and the gallery: restored backups, racing writers,
names that look like markup, read-only and empty files, outputs that would overwrite user files,
devices this machine lacks, killed processes, and arbitrary pairs files."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

import corpus
from visionscale.cli.main import app
from visionscale.face.gallery import Gallery, GalleryError, ModelMismatchError
from visionscale.face.lfw import LFWError, parse_pairs, parse_people

pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_error(r, *needles):
    """Exit 2, exactly one ``error:`` line, no traceback, and the line names ``needles``."""
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    assert "Traceback" not in r.output, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.output
    for n in needles:
        assert n in errors[0], r.output
    return errors[0]


def _unit(rng, n, d=8):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _state(path: Path):
    return path.read_bytes(), path.stat().st_mtime_ns


@pytest.fixture()
def faces(tmp_path):
    """Three 40 px images (taken as face crops with --no-detect)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    return [corpus.good_png(folder, f"img{i}.png", size=40, seed=i) for i in range(3)]


# -- 1. the index cache never disagrees with the database -------------------------------------
def _copy_db(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    for s in ("-wal", "-shm"):
        Path(str(dst) + s).unlink(missing_ok=True)


def test_restored_backup_never_uses_the_index_cache_of_other_rows(tmp_path):
    p, backup = tmp_path / "g.db", tmp_path / "backup.db"
    e = _unit(np.random.default_rng(0), 4)
    with Gallery(p, model="m") as g:
        g.enroll_many(["a", "b"], e[:2])
    _copy_db(p, backup)
    with Gallery(p, model="m") as g:
        g.enroll("x", embeddings=e[2])
        assert g.identify(embeddings=e[2])[0].name == "x"  # writes the cache of a, b, x
    assert Gallery(p, model="m").cache_path.is_file()
    _copy_db(backup, p)  # restore: x is gone
    with Gallery(p, model="m") as g:
        g.enroll("y", embeddings=e[3])  # same generation, same ids as x had, other vector
    with Gallery(p, model="m") as g:
        (rx,) = g.identify(embeddings=e[2], k=3)
        (ry,) = g.identify(embeddings=e[3], k=3)
    # x's vector is not in the database: its nearest person is someone else, far away.
    assert rx.matches[0].distance > 0.1, rx
    # sqrt(2 - 2 cos) turns the ~1e-7 float32 rounding of a unit vector's norm into up to ~5e-4.
    assert ry.name == "y" and ry.distance == pytest.approx(0.0, abs=1e-3)


def test_edits_by_another_program_invalidate_the_index_cache(tmp_path):
    p = tmp_path / "g.db"
    e = _unit(np.random.default_rng(1), 3)
    with Gallery(p, model="m") as g:
        g.enroll_many(["a", "b"], e[:2])
        assert g.identify(embeddings=e[0])[0].name == "a"  # cache written
    con = sqlite3.connect(p)  # e.g. the sqlite3 shell: no Gallery code runs
    con.execute("UPDATE embeddings SET vector = ? WHERE person_id = (SELECT id FROM people WHERE name = 'a')",
                (e[2].astype("<f4").tobytes(),))
    con.commit()
    con.close()
    with Gallery(p, model="m") as g:
        assert g.identify(embeddings=e[2])[0].name == "a"
        assert g.identify(embeddings=e[0])[0].distance > 0.1


def test_a_valid_index_cache_is_used(tmp_path, monkeypatch):
    p = tmp_path / "g.db"
    e = _unit(np.random.default_rng(2), 2)
    with Gallery(p, model="m") as g:
        g.enroll_many(["a", "b"], e)
        g.identify(embeddings=e[0])
    hits = []
    orig = Gallery._read_cache
    monkeypatch.setattr(Gallery, "_read_cache", lambda self, *a: hits.append(orig(self, *a)) or hits[-1])
    with Gallery(p, model="m") as g:
        assert g.identify(embeddings=e[1])[0].name == "b"
    assert len(hits) == 1 and hits[0] is not None


def test_rows_of_another_dimension_are_a_clear_error(tmp_path):
    p = tmp_path / "g.db"
    with Gallery(p, model="m") as g:
        g.enroll("a", embeddings=np.eye(4)[0])
    con = sqlite3.connect(p)
    con.execute("INSERT INTO embeddings(person_id, vector, source, created) VALUES (1, ?, NULL, 0)",
                (np.ones(6, "<f4").tobytes(),))
    con.commit()
    con.close()
    with Gallery(p, model="m") as g, pytest.raises(GalleryError, match="g.db"):
        g.identify(embeddings=np.eye(4)[0])


# -- 2. the model claim happens inside the write transaction -----------------------------------
def test_racing_first_enrolments_of_two_models_cannot_both_succeed(tmp_path):
    p = tmp_path / "g.db"
    g1, g2 = Gallery(p, model="m4"), Gallery(p, model="m8")
    orig = g1._check_model
    raced = []

    def check_then_lose_the_race(dim=None):
        orig(dim)  # the gallery is still empty here: no model claimed yet
        if not raced:  # ... and another process claims it before our write transaction begins
            raced.append(g2.enroll("b", embeddings=np.eye(8)[1]))

    g1._check_model = check_then_lose_the_race
    with pytest.raises(ModelMismatchError):
        g1.enroll("a", embeddings=np.eye(4)[0])
    assert raced == [1]
    g1.close()
    g2.close()
    with Gallery(p, model="m8") as g:
        assert g.stored_model == "m8" and g.dim == 8 and [x.name for x in g.list()] == ["b"]
        assert g.identify(embeddings=np.eye(8)[1])[0].name == "b"


def test_two_processes_enrolling_two_models_into_a_new_gallery(tmp_path):
    p = tmp_path / "g.db"
    # This process and a child each pass the early model check on the empty gallery, then wait
    # until the other has too: both then race for the write transaction, every time.
    script = textwrap.dedent("""
        import sys, time, numpy as np
        from pathlib import Path
        from visionscale.face.gallery import Gallery, ModelMismatchError
        path, folder = sys.argv[1], Path(sys.argv[2])
        g = Gallery(path, model="m8")
        check = g._check_model

        def check_then_wait(d=None):
            check(d)
            (folder / "checked").touch()
            while not (folder / "go").exists():
                time.sleep(0.002)

        g._check_model = check_then_wait
        try:
            g.enroll("p8", embeddings=np.eye(8)[0])
            print("ok")
        except ModelMismatchError:
            print("refused")
    """)
    child = subprocess.Popen([sys.executable, "-c", script, str(p), str(tmp_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    g = Gallery(p, model="m4")
    check = g._check_model

    def check_then_go(d=None):
        check(d)
        deadline = time.monotonic() + 60
        while not (tmp_path / "checked").exists():
            assert time.monotonic() < deadline and child.poll() is None, child.communicate()
            time.sleep(0.005)
        (tmp_path / "go").touch()

    g._check_model = check_then_go
    try:
        g.enroll("p4", embeddings=np.eye(4)[0])
        mine = "ok"
    except ModelMismatchError:
        mine = "refused"
    g.close()
    out, errs = child.communicate(timeout=60)
    assert child.returncode == 0, errs
    assert sorted([mine, out.strip()]) == ["ok", "refused"], (mine, out, errs)
    with Gallery(p) as g:
        assert len(g) == 1 and g.identify(embeddings=np.eye(g.dim)[0])[0].name == f"p{g.dim}"


# -- 3. names are printed literally -------------------------------------------------------------
MARKUP_NAMES = ["Smith [/tmp]", "Ada [guest]", "[bold red]Eve[/]", "Zoe :smile: [link=http://x]z[/link]"]


def test_names_that_look_like_markup_are_printed_literally(tmp_path, faces):
    db = tmp_path / "g.db"
    for name, img in zip(MARKUP_NAMES, faces):
        r = _cli("face", "enroll", name, img, "-g", db, "-m", "face_embedder_tiny", "--no-detect")
        assert r.exit_code == 0, r.output
        assert f"enrolled 1 image(s) of {name} in" in r.stdout
    r = _cli("face", "gallery", "list", "-g", db)
    assert r.exit_code == 0, r.output
    assert sorted(ln.split("\t")[0] for ln in r.stdout.splitlines()) == sorted(MARKUP_NAMES[:3])
    r = _cli("face", "identify", faces[0], faces[1], "-g", db, "--no-detect", "--threshold", "0.001", "-k", "3")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"{faces[0]}: {MARKUP_NAMES[0]}  ({MARKUP_NAMES[0]} 0.000")
    assert lines[1].startswith(f"{faces[1]}: {MARKUP_NAMES[1]}  ({MARKUP_NAMES[1]} 0.000")
    r = _cli("face", "gallery", "rename", MARKUP_NAMES[1], MARKUP_NAMES[3], "-g", db)
    assert r.exit_code == 0 and r.stdout.strip() == f"renamed {MARKUP_NAMES[1]} to {MARKUP_NAMES[3]}", r.output
    r = _cli("face", "gallery", "remove", MARKUP_NAMES[2], "-g", db)
    assert r.exit_code == 0 and r.stdout.startswith(f"removed {MARKUP_NAMES[2]} ("), r.output
    r = _cli("face", "gallery", "remove", "[nobody]", "-g", db)
    _one_line_error(r, "'[nobody]'")


# -- 4. read commands never create or modify the database ------------------------------------
def test_read_commands_leave_the_database_untouched(tmp_path, faces):
    db = tmp_path / "g.db"
    r = _cli("face", "enroll", "ann", faces[0], "-g", db, "-m", "face_embedder_tiny", "--no-detect")
    assert r.exit_code == 0, r.output
    before = _state(db)
    time.sleep(0.01)
    assert _cli("face", "gallery", "list", "-g", db).exit_code == 0
    r = _cli("face", "identify", faces[0], "-g", db, "--no-detect")
    assert r.exit_code == 0 and "ann" in r.stdout, r.output
    with Gallery(db, read_only=True) as g:
        assert [x.name for x in g.list()] == ["ann"]
        with pytest.raises(GalleryError, match="read-only"):
            g.enroll("bob", embeddings=np.ones(g.dim))
    assert _state(db) == before


@pytest.mark.parametrize("command", [["gallery", "list"], ["identify", "IMG", "--no-detect"],
                                     ["gallery", "rename", "a", "b"], ["gallery", "remove", "a"]])
def test_an_empty_gallery_file_is_an_error_and_stays_empty(tmp_path, faces, command):
    db = tmp_path / "g.db"
    db.write_bytes(b"")
    r = _cli("face", *[str(faces[0]) if c == "IMG" else c for c in command], "-g", db)
    _one_line_error(r, str(db), "empty")
    assert db.read_bytes() == b"" and sorted(os.listdir(tmp_path)) == ["g.db", "imgs"]
    with pytest.raises(GalleryError, match="empty"):
        Gallery(db, read_only=True)
    with pytest.raises(GalleryError, match="not found"):
        Gallery(tmp_path / "missing.db", read_only=True)
    assert not (tmp_path / "missing.db").exists()


def test_read_only_open_uses_immutable_only_where_nothing_can_write(tmp_path, monkeypatch):
    import visionscale.face.gallery as gallery_mod

    p = tmp_path / "g.db"
    with Gallery(p, model="m") as g:
        g.enroll("a", embeddings=np.eye(4)[0])
    assert "immutable" not in gallery_mod._read_only_uri(p)  # a writer could still come: no shortcut
    real_access = os.access
    monkeypatch.setattr(gallery_mod.os, "access", lambda f, mode: False if Path(f) == tmp_path else real_access(f, mode))
    assert gallery_mod._read_only_uri(p).endswith("?mode=ro&immutable=1")
    before = _state(p)
    with Gallery(p, read_only=True) as g:
        assert g.identify(embeddings=np.eye(4)[0])[0].name == "a"
    assert _state(p) == before and sorted(os.listdir(tmp_path)) == ["g.db"]  # no cache, no -wal/-shm
    # A write-ahead log that holds commits cannot be read without its -shm: say so, do not ignore it.
    Path(str(p) + "-wal").write_bytes(b"\0" * 64)
    with pytest.raises(GalleryError, match="-wal"):
        Gallery(p, read_only=True)


def _can_mount_read_only(folder: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {folder} {folder} && "
                        f"mount -o remount,bind,ro {folder} {folder} && ! touch {folder}/probe"],
                       capture_output=True)
    return r.returncode == 0


def test_gallery_on_a_read_only_file_system_can_be_listed_and_searched(tmp_path, faces):
    folder = tmp_path / "ro"
    folder.mkdir()
    db = folder / "g.db"
    r = _cli("face", "enroll", "ann", faces[0], "-g", db, "-m", "face_embedder_tiny", "--no-detect")
    assert r.exit_code == 0, r.output
    os.chmod(db, 0o444)
    os.chmod(folder, 0o555)
    try:
        cli = [sys.executable, "-m", "visionscale.cli.main", "face"]
        cmds = [cli + ["gallery", "list", "-g", str(db)], cli + ["identify", str(faces[0]), "-g", str(db), "--no-detect"]]
        if os.geteuid() != 0:  # chmod stops writes: run in this process
            outs = [_cli(*c[len(cli) - 1:]) for c in cmds]
            results = [(o.exit_code, o.stdout, o.stderr) for o in outs]
        elif _can_mount_read_only(folder):  # root ignores modes: bind-mount the folder read-only
            results = []
            for c in cmds:
                shell = (f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} {folder} && "
                         + " ".join(f"'{a}'" for a in c))
                pr = subprocess.run(["unshare", "-m", "sh", "-c", shell], capture_output=True, text=True, timeout=120)
                results.append((pr.returncode, pr.stdout, pr.stderr))
        else:
            pytest.skip("running as root without mount namespaces: read-only file systems cannot be made here")
        assert [code for code, *_ in results] == [0, 0], results
        assert results[0][1] == "ann\t1\n" and ": ann  (ann 0.000" in results[1][1], results
        assert sorted(os.listdir(folder)) == ["g.db"]
    finally:
        os.chmod(folder, 0o755)


# -- 5. demo data never overwrites a user's files -----------------------------------------------
def test_make_lfw_demo_refuses_a_folder_holding_user_files(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "pairs.txt").write_text("my own pairs\n")
    args = ["face", "make-lfw-demo", out, "--people", "3", "--images-per-person", "2", "--size", "32"]
    _one_line_error(_cli(*args), str(out), "pairs.txt")
    assert sorted(os.listdir(out)) == ["pairs.txt"] and (out / "pairs.txt").read_text() == "my own pairs\n"
    assert sorted(os.listdir(tmp_path)) == ["demo"]  # no staging folder left behind
    r = _cli(*args, "--overwrite")
    assert r.exit_code == 0, r.output
    assert parse_pairs(out / "pairs.txt").n_folds == 10
    fresh = tmp_path / "fresh"
    assert _cli(*[fresh if a == out else a for a in args]).exit_code == 0
    r = _cli(*[fresh if a == out else a for a in args])  # its own earlier output is replaced
    assert r.exit_code == 0, r.output


def test_eval_lfw_refuses_an_output_folder_with_user_files_before_embedding(tmp_path, monkeypatch):
    from visionscale.face import lfw

    data = tmp_path / "demo"
    lfw.make_synthetic_lfw(data, n_people=3, images_per_person=2, size=32, n_sets=1, per_set=2, dev_pairs=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    monkeypatch.setattr(lfw, "evaluate_lfw", lambda *a, **k: pytest.fail("embedded before checking --out"))
    r = _cli("face", "eval-lfw", "--root", data, "--pairs", data / "pairs.txt", "-m", "face_embedder_tiny", "--out", out)
    _one_line_error(r, "report.json")
    assert (out / "report.json").read_text() == "{}"


# -- 6. devices -------------------------------------------------------------------------------
BAD_DEVICES = ["tpu", "cuda:x", "cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"])


@pytest.mark.parametrize("device", BAD_DEVICES)
def test_every_face_command_rejects_a_bad_device_in_one_line(tmp_path, faces, device):
    demo = tmp_path / "demo"
    from visionscale.face.lfw import make_synthetic_lfw

    make_synthetic_lfw(demo, n_people=3, images_per_person=2, size=32, n_sets=1, per_set=2, dev_pairs=2)
    db = tmp_path / "g.db"
    assert _cli("face", "enroll", "ann", faces[0], "-g", db, "-m", "face_embedder_tiny", "--no-detect").exit_code == 0
    tiny = ["-m", "face_embedder_tiny", "--no-detect"]
    commands = [
        ["detect", faces[0]],
        ["verify", faces[0], faces[1], *tiny],
        ["enroll", "bob", faces[1], "-g", db, *tiny],
        ["identify", faces[1], "-g", db, "--no-detect"],
        ["eval-lfw", "--root", demo, "--pairs", demo / "pairs.txt", "-m", "face_embedder_tiny"],
        ["train", demo / "lfw", "--out", tmp_path / "run", "-m", "face_embedder_tiny", "--epochs", "1"],
    ]
    for cmd in commands:
        _one_line_error(_cli("face", *cmd, "--device", device), repr(device))
    assert not (tmp_path / "run").exists()


def test_the_python_api_rejects_a_bad_device(faces):
    from visionscale.errors import DeviceError
    from visionscale.face.api import FaceRecognizer, embed
    from visionscale.face.detector import FaceDetector
    from visionscale.face.embedder import build_embedder

    for call in (lambda: FaceRecognizer("face_embedder_tiny", detector=None, device="tpu"),
                 lambda: embed([faces[0]], "face_embedder_tiny", detector=None, device="cuda:x"),
                 lambda: build_embedder("face_embedder_tiny", device="tpu"),
                 lambda: build_embedder("face_embedder_tiny").embed([np.zeros((32, 32, 3), np.uint8)], device="tpu"),
                 lambda: FaceDetector("tiny", weights=None, device="tpu")):
        with pytest.raises(DeviceError, match="tpu|cuda:x"):
            call()


# -- 7. face detect --out is checked before any work --------------------------------------------
def test_detect_out_that_cannot_be_a_folder_is_one_line_error(tmp_path, faces, monkeypatch):
    from visionscale.face import detector

    monkeypatch.setattr(detector.FaceDetector, "__init__", lambda *a, **k: pytest.fail("built before checking --out"))
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    for out in (blocker, blocker / "sub"):
        _one_line_error(_cli("face", "detect", faces[0], "--out", out), str(blocker))
    assert blocker.read_text() == "a file, not a folder"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "img0_faces.png").write_bytes(b"user's file")
    _one_line_error(_cli("face", "detect", faces[0], "--out", theirs), "img0_faces.png")
    assert (theirs / "img0_faces.png").read_bytes() == b"user's file"


# -- 8. property tests: untrusted text never raises anything but the documented error ----------
_token = st.one_of(st.from_regex(r"[A-Za-z_]{1,6}", fullmatch=True), st.integers(-3, 12).map(str),
                   st.sampled_from(["", " ", "\t", "10", "1", "0", "x", "-1", "1e3", "٣", "+2", "1_0", "\x00"]))
_line = st.lists(_token, max_size=5).map("\t".join)
_lfw_text = st.one_of(st.text(max_size=120), st.lists(_line, max_size=12).map("\n".join))


@given(data=st.one_of(_lfw_text.map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=120)))
def test_lfw_readers_parse_or_raise_lfw_error(tmp_path, data):
    f = tmp_path / "pairs.txt"
    f.write_bytes(data)
    for parse in (parse_pairs, parse_people):
        try:
            result = parse(f)
        except LFWError as exc:
            assert str(f) in str(exc)
            continue
        if parse is parse_pairs:
            assert len(result.pairs) == 2 * result.n_folds * result.per_fold
            assert all(isinstance(p.n1, int) and p.n1 >= 0 and p.n2 >= 0 for p in result.pairs)
        else:
            assert all(isinstance(c, int) and c >= 0 for s in result for _, c in s)


@pytest.fixture(scope="module")
def name_gallery(tmp_path_factory):
    with Gallery(tmp_path_factory.mktemp("names") / "g.db", model="m", cache_index=False) as g:
        yield g


_names = st.one_of(st.text(max_size=40), st.text(alphabet="[]/\\:@ \n\t\x00\x1b\u2028\u200bé漢", max_size=12),
                   st.text(min_size=1, max_size=3).map(lambda s: s * 500))


@given(name=_names, seed=st.integers(0, 2**16))
def test_gallery_names_round_trip_or_are_refused_clearly(name_gallery, name, seed):
    g = name_gallery
    v = _unit(np.random.default_rng(seed), 1, 4)
    before = {p.name: p.n_embeddings for p in g.list()}
    try:
        g.enroll(name, embeddings=v)
    except GalleryError as exc:
        assert "name" in str(exc)
        assert {p.name: p.n_embeddings for p in g.list()} == before  # nothing was written
        return
    after = {p.name: p.n_embeddings for p in g.list()}
    assert after[name] == before.get(name, 0) + 1 and set(after) == set(before) | {name}
    assert g.identify(embeddings=v, k=1)[0].matches[0].similarity == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("name", ["", "   ", "a\x00b", "a\nb", "\x1b[31mred", "x\u0085y", "\ud800", " lead", "x" * 1001])
def test_gallery_refuses_names_it_cannot_show_or_store(tmp_path, name):
    with Gallery(tmp_path / "g.db", model="m") as g:
        with pytest.raises(GalleryError, match="name"):
            g.enroll(name, embeddings=np.ones(4))
        g.enroll("ok", embeddings=np.ones(4))
        with pytest.raises(GalleryError, match="name"):
            g.rename("ok", name)
        assert [p.name for p in g.list()] == ["ok"]


# -- kill -9 in the middle of enrolments --------------------------------------------------------
def test_kill_9_during_enrolment_leaves_a_working_gallery(tmp_path):
    p = tmp_path / "g.db"
    script = textwrap.dedent(f"""
        import sys, numpy as np
        from visionscale.face.gallery import Gallery
        with Gallery({str(p)!r}, model="m") as g:
            for i in range(10**6):
                g.enroll(f"p{{i}}", embeddings=np.random.default_rng(i).normal(size=(2, 16)))
                print(i, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = -1
    deadline = time.monotonic() + 60
    while done < 20 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        done = int(line)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    with Gallery(p, model="m") as g:
        assert g._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        people = {x.name: x.n_embeddings for x in g.list()}
        assert set(people) >= {f"p{i}" for i in range(done + 1)} and set(people.values()) == {2}
        assert g.identify(embeddings=np.random.default_rng(5).normal(size=(2, 16)))[1].name == "p5"
        g.enroll("after", embeddings=np.ones(16))
        assert g.identify(embeddings=np.ones(16))[0].name == "after"
