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
from visionscale.errors import InvalidValueError, MissingDependencyError
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
    for index in ["exact"] + (["ivf"] if faiss_available() else []):
        r = run(app, ["identify", str(paths[2]), "-g", db, "--no-detect", "--threshold", "0.001", "--json",
                      "--index", index])
        assert r.exit_code == 0 and json.loads(r.stdout)[0]["faces"][0]["name"] == "bo", r.output
    r = run(app, ["identify", str(paths[2]), "-g", db, "--no-detect", "--index", "lsh"])
    assert r.exit_code == 2 and "index must be one of auto, exact, ivf, hnsw" in r.output
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


# -- metrics and approximate indexes ----------------------------------------------------------

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="approximate indexes need faiss")


def _clustered(rng, n_people, d=32, extra=0, raw=False, noise=0.03, same=0.4):
    """People as random centres, a few with several embeddings; queries = centre + fresh noise.

    ``raw``: dlib-like unnormalised descriptors (a shared offset of norm 1.4, identities ~0.9
    apart, same-person samples ~``same`` apart); else unit vectors plus ``noise`` per value."""
    if raw:
        m = rng.normal(size=d)
        m *= 1.4 / np.linalg.norm(m)
        centres = m + 0.9 / np.sqrt(2 * d) * rng.normal(size=(n_people, d))
        noise = same / np.sqrt(2 * d)
    else:
        centres = _unit(rng, n_people, d)
    owner = np.concatenate([np.arange(n_people), rng.integers(0, n_people, extra)])
    emb = centres[owner] + noise * rng.normal(size=(len(owner), d))
    qi = rng.integers(0, n_people, 200)
    q = centres[qi] + noise * rng.normal(size=(len(qi), d))
    return emb.astype(np.float32), owner, q.astype(np.float32), qi


def _fill(g, emb, owner):
    n_people = owner.max() + 1
    g.enroll_many([f"p{i}" for i in range(n_people)], emb[:n_people])
    for j in range(n_people, len(owner)):
        g.enroll(f"p{owner[j]}", embeddings=emb[j])


class _Embedder:
    def __init__(self, model_id, metric=None, dim=8):
        self.model_id, self.dim = model_id, dim
        if metric is not None:
            self.metric = metric

    def embed(self, images):
        return np.stack([np.asarray(i, np.float32).ravel()[: self.dim] for i in images])


@pytest.mark.parametrize("backend", BACKENDS)
def test_euclidean_metric_keeps_raw_vectors_and_plain_distances(tmp_path, backend):
    rng = np.random.default_rng(3)
    emb, owner, q, qi = _clustered(rng, 50, d=64, extra=20, raw=True)
    with Gallery(tmp_path / "g.db", model="dlib", metric="euclidean", backend=backend, index="exact") as g:
        _fill(g, emb, owner)
        assert g.metric == g.stored_metric == "euclidean"
        # Stored as given (not normalised): dlib compares raw descriptors.
        np.testing.assert_array_equal(g.embeddings_of("p0"), emb[owner == 0])
        res = g.identify(embeddings=q, k=3, threshold=0.6)
    assert [r.name for r in res] == [f"p{i}" for i in qi]
    for r, x in zip(res, q):
        for m in r.matches:
            own = emb[owner == int(m.name[1:])].astype(np.float64)
            want = np.linalg.norm(own - x, axis=1).min()
            # float64 recomputation of float32 data: agreement to ~1e-6 relative to distances ~0.4-1
            assert m.distance == pytest.approx(want, rel=1e-5)
        assert [m.distance for m in r.matches] == sorted(m.distance for m in r.matches)
        # same-person ~0.4 apart, other people ~0.9+: known under dlib's 0.6
        assert r.distance < 0.6 and r.matches[1].distance > 0.6


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_distance_to_a_person_is_identifys(tmp_path, metric):
    rng = np.random.default_rng(5)
    emb, owner, q, _ = _clustered(rng, 20, d=32, extra=5, raw=metric == "euclidean")
    with Gallery(tmp_path / "g.db", model="m", metric=metric, index="exact") as g:
        _fill(g, emb, owner)
        for r, x in zip(g.identify(embeddings=q, k=3), q):
            for m in r.matches:
                # Both in float64 from the same float32 rows: equal up to summation order.
                assert g.distance(m.name, x) == pytest.approx(m.distance, rel=1e-9, abs=1e-12)
        with pytest.raises(GalleryError, match="no person named 'nobody'"):
            g.distance("nobody", q[0])
        with pytest.raises(ModelMismatchError, match="dimensions"):
            g.distance("p0", q[0][:8])


def test_metric_is_claimed_and_never_mixed(tmp_path):
    p = tmp_path / "g.db"
    with Gallery(p, embedder=_Embedder("dlib128", metric="euclidean")) as g:
        g.enroll("a", images=[np.arange(8) + 1.0])
        assert g.stored_metric == "euclidean"
    for kwargs in ({"metric": "cosine"}, {"embedder": _Embedder("dlib128")}):  # no attribute = cosine
        with Gallery(p, **kwargs) as g:
            with pytest.raises(ModelMismatchError, match="euclidean distance; refusing to mix in cosine"):
                g.enroll("b", embeddings=np.ones(8))
            with pytest.raises(ModelMismatchError, match="refusing to mix"):
                g.identify(embeddings=np.ones(8))
    with Gallery(p) as g:  # nothing requested: the stored metric is used
        assert g.metric == "euclidean"
        assert g.identify(embeddings=np.arange(8) + 1.0)[0].distance == pytest.approx(0.0, abs=1e-6)
    # Another model with the same metric is refused too (never mix embedding spaces).
    with Gallery(p, embedder=_Embedder("other128", metric="euclidean")) as g:
        with pytest.raises(ModelMismatchError, match="model 'dlib128'; refusing to mix in 'other128'"):
            g.enroll("c", images=[np.ones(8)])
    # A gallery from before metrics existed (no meta row) is cosine.
    old = tmp_path / "old.db"
    with Gallery(old, model="m") as g:
        g.enroll("a", embeddings=np.eye(4)[0])
    con = sqlite3.connect(old)
    with con:
        con.execute("DELETE FROM meta WHERE key = 'metric'")
    con.close()
    with Gallery(old, model="m") as g:
        assert g.stored_metric == "cosine"
    with Gallery(old, model="m", metric="euclidean") as g, pytest.raises(ModelMismatchError, match="cosine"):
        g.enroll("b", embeddings=np.eye(4)[1])
    with pytest.raises(InvalidValueError, match="metric"):
        Gallery(tmp_path / "x.db", metric="manhattan")


def test_index_choice_and_missing_faiss(tmp_path, monkeypatch):
    import visionscale.face.gallery as gallery_module

    rng = np.random.default_rng(4)
    with Gallery(tmp_path / "g.db", model="m", ann_threshold=50) as g:
        g.enroll_many([f"p{i}" for i in range(49)], _unit(rng, 49))
        g.identify(embeddings=_unit(rng, 1))
        assert g.active_index == "exact"  # below the threshold
        g.enroll("late", embeddings=_unit(rng, 1))
        g.identify(embeddings=_unit(rng, 1))
        assert g.active_index == ("ivf" if faiss_available() else "exact")
    with pytest.raises(InvalidValueError, match="index must be one of"):
        Gallery(tmp_path / "g.db", index="lsh")
    monkeypatch.setattr(gallery_module, "faiss_available", lambda: False)
    for kind in ("ivf", "hnsw"):
        with pytest.raises(MissingDependencyError, match="pip install faiss-cpu"):
            Gallery(tmp_path / "g.db", index=kind)
    with Gallery(tmp_path / "g.db", model="m", ann_threshold=1, backend="numpy") as g:  # auto stays exact
        assert g.identify(embeddings=_unit(rng, 1))[0].matches and g.active_index == "exact"


@needs_faiss
@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_approximate_index_recall_and_exact_distances(tmp_path, kind, metric):
    from visionscale.face.gallery_ann import AnnParams

    rng = np.random.default_rng(5)
    # Same-person distances ~0.3 of other people's in both metrics: clustered data.
    emb, owner, q, qi = _clustered(rng, 2000, d=32, extra=100, raw=metric == "euclidean", noise=0.05, same=0.25)
    p = tmp_path / "g.db"
    with Gallery(p, model="m", metric=metric, index="exact") as g:
        _fill(g, emb, owner)
        exact = g.identify(embeddings=q, k=3)
    # Few cells visited / a short HNSW list, so the test exercises a really approximate search.
    params = AnnParams(nlist=32, nprobe=8, ef_search=16, rerank=16)
    with Gallery(p, model="m", index=kind, ann_params=params) as g:
        approx = g.identify(embeddings=q, k=3)
        assert g.active_index == kind
    assert g.ann_path.is_file()
    recall = np.mean([a.matches[0].name == e.matches[0].name for a, e in zip(approx, exact)])
    assert recall >= 0.99
    assert np.mean([e.matches[0].name == f"p{i}" for e, i in zip(exact, qi)]) == 1.0  # the data are separable
    for a, e in zip(approx, exact):
        if a.matches[0].name == e.matches[0].name:
            # Candidates are re-ranked with the same float64 formula: identical distances.
            assert a.matches[0].distance == e.matches[0].distance


@needs_faiss
def test_approximate_index_file_is_reused_updated_and_rebuilt(tmp_path, monkeypatch):
    from visionscale.face import gallery_ann

    builds = []
    real_build = gallery_ann.build
    monkeypatch.setattr(gallery_ann, "build", lambda *a, **kw: builds.append(1) or real_build(*a, **kw))
    rng = np.random.default_rng(6)
    e = _unit(rng, 1200, 16)
    p = tmp_path / "g.db"
    params = gallery_ann.AnnParams(nlist=16, nprobe=16)  # all cells: exact answers, whatever the data
    with Gallery(p, model="m", index="ivf", ann_params=params) as g:
        g.enroll_many([f"p{i}" for i in range(1000)], e[:1000])
        assert g.identify(embeddings=e[5])[0].name == "p5"
    assert len(builds) == 1 and g.ann_path.is_file()
    stamp = g.ann_path.stat().st_mtime_ns
    with Gallery(p, model="m", index="ivf", ann_params=params, read_only=True) as g:  # reopen: the file is used
        assert g.identify(embeddings=e[7])[0].name == "p7"
    assert len(builds) == 1 and g.ann_path.stat().st_mtime_ns == stamp
    with Gallery(p, model="m", index="ivf", ann_params=params) as reader, Gallery(p, model="m") as writer:
        assert reader.identify(embeddings=e[1])[0].name == "p1"
        writer.enroll_many([f"q{i}" for i in range(200)], e[1000:])  # another connection adds people
        assert reader.identify(embeddings=e[1100])[0].name == "q100"  # stale -> new rows appended
        writer.rename("q100", "quinn")  # a new state, the same rows: nothing to append
        assert reader.identify(embeddings=e[1100])[0].name == "quinn"
        assert len(builds) == 1
        writer.remove("p3")  # a removal cannot be appended: rebuilt
        (r,) = reader.identify(embeddings=e[3], k=3)
        assert "p3" not in [m.name for m in r.matches] and len(builds) == 2
        state = writer._meta("state")
    head = gallery_ann.read(g.ann_path).header()
    assert head["n"] == 1199 and head["key"].endswith("/" + state)
    # A damaged or foreign file is rebuilt with a warning, never a crash.
    for junk in (b"garbage", g.ann_path.read_bytes()[:-100]):
        g.ann_path.write_bytes(junk)
        with Gallery(p, model="m", index="ivf", ann_params=params) as g2:
            with pytest.warns(UserWarning, match="unreadable approximate index"):
                assert g2.identify(embeddings=e[8])[0].name == "p8"
        assert gallery_ann.read(g.ann_path).header()["n"] == 1199
