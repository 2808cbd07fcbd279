"""The SQLite + faiss face gallery: persistence, crash safety, concurrency, schema and model checks."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from visionscale.cli._common import CLIGroup
from visionscale.face.gallery import (
    SCHEMA_VERSION,
    Gallery,
    GalleryError,
    ModelMismatchError,
    SchemaError,
    faiss_available,
)

BACKENDS = ["numpy"] + (["faiss"] if faiss_available() else [])


def _unit(rng, n, d=16):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("backend", BACKENDS)
def test_enroll_identify_list_rename_remove(tmp_path, backend):
    rng = np.random.default_rng(0)
    e = _unit(rng, 5)
    with Gallery(tmp_path / "g.db", model="m1", backend=backend) as g:
        assert g.identify(embeddings=e[:1])[0].name is None  # empty gallery: unknown
        assert g.enroll("alice", embeddings=e[0:2], sources=["a1.jpg", "a2.jpg"]) == 2
        assert g.enroll("bob", embeddings=e[2]) == 1
        assert g.enroll("bob", embeddings=e[3] * 7.0) == 1  # more of the same person; stored normalised
        assert [(p.name, p.n_embeddings) for p in g.list()] == [("alice", 2), ("bob", 2)]
        assert np.allclose(np.linalg.norm(g.embeddings_of("bob"), axis=1), 1.0)
        # Each query's nearest embedding decides; each person listed once, best first.
        (r,) = g.identify(embeddings=e[3], k=5)
        assert r.name == "bob" and r.distance == pytest.approx(0.0, abs=1e-5)
        assert [m.name for m in r.matches] == ["bob", "alice"]
        best_alice = max(float(e[3] @ e[0]), float(e[3] @ e[1]))
        assert r.matches[1].similarity == pytest.approx(best_alice, abs=1e-6)
        assert r.matches[1].distance == pytest.approx(np.sqrt(2 - 2 * best_alice), abs=1e-6)
        # Someone new is "unknown" at a strict threshold, but the candidates are still listed.
        (u,) = g.identify(embeddings=e[4], k=1, threshold=0.05)
        assert u.name is None and u.label == "unknown" and len(u.matches) == 1
        g.rename("bob", "robert")
        assert g.identify(embeddings=e[2])[0].name == "robert"
        assert g.remove("alice") == 2
        assert [p.name for p in g.list()] == ["robert"]
        assert g.identify(embeddings=e[0], k=3)[0].matches[0].name == "robert"
        with pytest.raises(GalleryError, match="no person named 'alice'"):
            g.remove("alice")
        g.enroll("carol", embeddings=e[4])
        with pytest.raises(GalleryError, match="already enrolled"):
            g.rename("carol", "robert")


def test_bad_input(tmp_path):
    with Gallery(tmp_path / "g.db", model="m") as g:
        for name in ("", "  x", "a\nb"):
            with pytest.raises(GalleryError, match="name"):
                g.enroll(name, embeddings=np.ones(4))
        with pytest.raises(GalleryError, match="NaN"):
            g.enroll("x", embeddings=np.array([1.0, np.nan, 0, 0]))
        with pytest.raises(GalleryError, match="all-zero"):
            g.enroll("x", embeddings=np.zeros(4))
        with pytest.raises(GalleryError, match="exactly one"):
            g.enroll("x")
        with pytest.raises(GalleryError, match="embedder"):
            g.enroll("x", images=[np.zeros((8, 8, 3), np.uint8)])
        g.enroll_many(["a", "b"], np.eye(4)[:2])
        with pytest.raises(GalleryError, match="already enrolled: a"):
            g.enroll_many(["c", "a"], np.eye(4)[:2])
        assert len(g) == 2  # the failed bulk insert added nobody


def test_model_and_dimension_are_not_mixed(tmp_path):
    p = tmp_path / "g.db"
    with Gallery(p, model="face_embedder_tiny/4d/aaaa") as g:
        g.enroll("a", embeddings=np.eye(4)[0])
    with Gallery(p, model="face_embedder_tiny/4d/bbbb") as g:
        with pytest.raises(ModelMismatchError, match="refusing to mix"):
            g.enroll("b", embeddings=np.eye(4)[1])
        with pytest.raises(ModelMismatchError):
            g.identify(embeddings=np.eye(4)[1])
    with Gallery(p) as g:  # no model given: the dimension is still checked
        assert g.stored_model == "face_embedder_tiny/4d/aaaa" and g.dim == 4
        with pytest.raises(ModelMismatchError, match="4-d"):
            g.identify(embeddings=np.ones(8))
        assert g.list()[0].name == "a"


def test_images_through_an_embedder(tmp_path):
    from visionscale.face.api import FaceRecognizer
    from visionscale.face.embedder import build_embedder

    rec = FaceRecognizer(build_embedder("face_embedder_tiny"), detector=None)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(3)]
    with Gallery(tmp_path / "g.db", embedder=rec) as g:
        g.enroll("x", images=imgs[:2])
        g.enroll("y", images=imgs[2:])
        assert g.stored_model == rec.model_id
        assert [r.name for r in g.identify(images=imgs, threshold=1e-3)] == ["x", "x", "y"]


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed (optional; numpy gives the same results)")
def test_faiss_and_numpy_agree(tmp_path):
    rng = np.random.default_rng(1)
    e = _unit(rng, 300, 32)
    with Gallery(tmp_path / "g.db", model="m") as g:
        g.enroll_many([f"p{i}" for i in range(200)], e[:200])
        for i in range(200, 300):  # some people with several embeddings
            g.enroll(f"p{i % 7}", embeddings=e[i])
    q = _unit(rng, 20, 32)
    out = {}
    for backend in ("numpy", "faiss"):
        with Gallery(tmp_path / "g.db", model="m", backend=backend) as g:
            out[backend] = [[(m.name, m.distance) for m in r.matches] for r in g.identify(embeddings=q, k=5)]
    assert out["numpy"] == out["faiss"]  # same names, same (float64-recomputed) distances


def test_persistence_and_index_cache(tmp_path):
    p = tmp_path / "g.db"
    rng = np.random.default_rng(2)
    e = _unit(rng, 4)
    with Gallery(p, model="m") as g:
        g.enroll_many(["a", "b", "c"], e[:3])
        first = g.identify(embeddings=e[:3])
        gen = g.generation
    assert g.cache_path.is_file()
    with Gallery(p, model="m") as g:  # restart: same answers, cache reused
        assert [r.name for r in g.identify(embeddings=e[:3])] == [r.name for r in first] == ["a", "b", "c"]
        assert g.generation == gen
    g.cache_path.unlink()  # missing cache: rebuilt from the database
    with Gallery(p, model="m") as g:
        assert g.identify(embeddings=e[1])[0].name == "b"
    assert g.cache_path.is_file()
    # A stale cache (the database changed behind its back) is not trusted.
    stale = g.cache_path.read_bytes()
    with Gallery(p, model="m") as g:
        g.enroll("d", embeddings=e[3])
    g.cache_path.write_bytes(stale)
    with Gallery(p, model="m") as g:
        assert g.identify(embeddings=e[3])[0].name == "d"
    g.cache_path.write_bytes(b"garbage")  # a damaged cache is only a cache
    with Gallery(p, model="m") as g:
        assert g.identify(embeddings=e[0])[0].name == "a"


def test_sees_other_connections_writes(tmp_path):
    p = tmp_path / "g.db"
    e = np.eye(4, dtype=np.float32)
    with Gallery(p, model="m") as reader, Gallery(p, model="m") as writer:
        writer.enroll("a", embeddings=e[0])
        assert reader.identify(embeddings=e[0])[0].name == "a"
        writer.enroll("b", embeddings=e[1])
        writer.rename("a", "ann")
        assert reader.identify(embeddings=e[1])[0].name == "b"  # generation changed -> index rebuilt
        assert reader.identify(embeddings=e[0])[0].name == "ann"
        writer.remove("b")
        assert reader.identify(embeddings=e[1])[0].matches[0].name == "ann"


def test_newer_schema_and_foreign_files_are_refused_untouched(tmp_path):
    p = tmp_path / "g.db"
    with Gallery(p, model="m") as g:
        g.enroll("a", embeddings=np.eye(4)[0])
    con = sqlite3.connect(p)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    before = _sha(p)
    with pytest.raises(SchemaError, match="newer"):
        Gallery(p)
    assert _sha(p) == before
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"definitely not sqlite" * 10)
    with pytest.raises(GalleryError, match="not an SQLite database"):
        Gallery(junk)
    assert junk.read_bytes() == b"definitely not sqlite" * 10
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    before = _sha(other)
    with pytest.raises(GalleryError, match="not a visionscale gallery"):
        Gallery(other)
    assert _sha(other) == before


def test_crash_mid_enroll_loses_nothing_committed(tmp_path):
    p = tmp_path / "g.db"
    script = textwrap.dedent(f"""
        import os, numpy as np
        from visionscale.face.gallery import Gallery
        g = Gallery({str(p)!r}, model="m")
        g.enroll("alice", embeddings=np.eye(8, dtype=np.float32)[:2])
        g._before_commit = lambda: os._exit(3)   # die after bob's rows are written, before COMMIT
        g.enroll("bob", embeddings=np.eye(8, dtype=np.float32)[2:5])
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    with Gallery(p, model="m") as g:
        assert [(x.name, x.n_embeddings) for x in g.list()] == [("alice", 2)]
        assert g._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert g.identify(embeddings=np.eye(8)[1])[0].name == "alice"
        g.enroll("bob", embeddings=np.eye(8)[2])  # and it still takes writes
        assert g.identify(embeddings=np.eye(8)[2])[0].name == "bob"


def test_readers_while_another_process_enrolls(tmp_path):
    p = tmp_path / "g.db"
    n = 40
    with Gallery(p, model="m") as g:
        g.enroll("seed", embeddings=np.eye(64, dtype=np.float32)[0])
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import numpy as np
        from visionscale.face.gallery import Gallery
        e = np.eye(64, dtype=np.float32)
        with Gallery({str(p)!r}, model="m", cache_index=False) as g:
            for i in range(1, {n + 1}):
                g.enroll(f"p{{i}}", embeddings=e[i])
    """)], stderr=subprocess.PIPE, text=True)
    seen = set()
    reads = 0
    with Gallery(p, model="m") as g:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = writer.poll() is not None
            people = {x.name for x in g.list()}
            assert "seed" in people
            seen.add(len(people))
            i = len(people) - 1
            if i >= 1:  # the latest person is already searchable from this process
                assert g.identify(embeddings=np.eye(64)[i])[0].name == f"p{i}"
            reads += 1
            if done:
                break
        assert writer.wait(timeout=60) == 0, writer.stderr.read()
        assert len(g) == n + 1
        assert g.identify(embeddings=np.eye(64)[n])[0].name == f"p{n}"
    assert reads > 1


def test_cli_gallery_commands(tmp_path):
    from PIL import Image

    from visionscale.cli.face_recognition import register

    app = typer.Typer(cls=CLIGroup)  # as the `face` app: its boundary prints library errors
    register(app)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(paths[-1])
    db = str(tmp_path / "faces.db")
    run = CliRunner().invoke
    r = run(app, ["enroll", "ann", str(paths[0]), str(paths[1]), "-g", db, "-m", "face_embedder_tiny", "--no-detect"])
    assert r.exit_code == 0 and "enrolled 2 image(s) of ann" in r.stdout, r.output
    # Later commands find the model the gallery was built with.
    r = run(app, ["enroll", "bo", str(paths[2]), "-g", db, "--no-detect"])
    assert r.exit_code == 0, r.output
    r = run(app, ["identify", str(paths[2]), str(paths[0]), "-g", db, "--no-detect", "--threshold", "0.001", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)  # one entry per image, with one answer per face (--no-detect: the whole image)
    assert [[f["name"] for f in x["faces"]] for x in res] == [["bo"], ["ann"]]
    assert [x["image"] for x in res] == [str(paths[2]), str(paths[0])]
    r = run(app, ["gallery", "list", "-g", db, "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["people"] == [{"name": "ann", "embeddings": 2}, {"name": "bo", "embeddings": 1}]
    assert run(app, ["gallery", "rename", "bo", "bob", "-g", db]).exit_code == 0
    assert run(app, ["gallery", "remove", "ann", "-g", db]).exit_code == 0
    r = run(app, ["gallery", "list", "-g", db])
    assert r.exit_code == 0 and r.stdout.split() == ["bob", "1"]
    r = run(app, ["gallery", "remove", "ann", "-g", db])
    assert r.exit_code == 2 and "no person named 'ann'" in r.output
    r = run(app, ["enroll", "x", str(paths[0]), "-g", db, "-m", "face_embedder_resnet18", "--no-detect"])
    assert r.exit_code == 2 and "refusing to mix" in r.output
    r = run(app, ["identify", str(paths[0]), "-g", str(tmp_path / "none.db"), "--no-detect"])
    assert r.exit_code == 2 and "gallery not found" in r.output
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    r = run(app, ["gallery", "list", "-g", db])
    assert r.exit_code == 2 and "newer" in r.output
