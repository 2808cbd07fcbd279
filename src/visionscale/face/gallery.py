"""A persistent face gallery: people, their embeddings, and exact nearest-neighbour search.

Storage is one SQLite file (WAL mode, so readers never block the writer and vice versa):

* ``meta`` (key/value): ``model`` (the embedder id, e.g. ``face_embedder_resnet18/512d/<sha>``),
  ``dim``, ``generation`` (bumped by every change of the stored vectors) and ``uuid``;
* ``people`` (id, unique name, created) and ``embeddings`` (id, person id, float32 blob,
  source, created), deleted with their person;
* ``PRAGMA user_version`` = schema version. A file from a newer schema is refused before
  anything is written to it (it is first opened read-only).

Every change is one transaction, so a crash midway (power cut, ``kill -9``) loses that
change only; everything committed before stays. Vectors are stored L2-normalised.

Search: an exact inner-product index (faiss ``IndexFlatIP`` when the optional ``faiss``
package is importable, otherwise a numpy matrix product: same maths, same results up to
float rounding of exact ties) over the normalised embeddings. It is rebuilt from the
database whenever the database's generation differs from the one the index was built at
(another process enrolled, or the file changed), and cached beside the database as
``<name>.vectors.safetensors`` (tagged with the database's uuid and generation; a missing
or stale cache is simply rebuilt). Distance = Euclidean distance of unit vectors =
``sqrt(2 - 2 cos)``; a query is identified as the nearest person when that distance is
below ``threshold``, otherwise as unknown.
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

__all__ = [
    "Gallery",
    "GalleryError",
    "SchemaError",
    "ModelMismatchError",
    "Match",
    "Identification",
    "PersonInfo",
    "SCHEMA_VERSION",
    "faiss_available",
]

SCHEMA_VERSION = 1
_SQLITE_MAGIC = b"SQLite format 3\x00"
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE people (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE embeddings (
    id INTEGER PRIMARY KEY,
    person_id INTEGER NOT NULL REFERENCES people(id) ON DELETE CASCADE,
    vector BLOB NOT NULL,
    source TEXT,
    created REAL NOT NULL
);
CREATE INDEX embeddings_person ON embeddings(person_id);
"""


class GalleryError(ValueError):
    """Bad gallery file or bad input to a gallery operation."""


class SchemaError(GalleryError):
    """The file was written by a newer (or unknown) gallery schema; it was not modified."""


class ModelMismatchError(GalleryError):
    """Embeddings of a different model (or dimension) than the gallery's."""


class Embedder(Protocol):
    model_id: str
    dim: int

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray: ...


@dataclass(frozen=True)
class Match:
    name: str
    distance: float
    similarity: float  # cosine similarity of the unit embeddings


@dataclass(frozen=True)
class Identification:
    """Result for one query: ``name`` is None (unknown) when no one is within the threshold."""

    name: str | None
    distance: float | None
    matches: list[Match]

    @property
    def label(self) -> str:
        return self.name if self.name is not None else "unknown"


@dataclass(frozen=True)
class PersonInfo:
    name: str
    n_embeddings: int
    created: float


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise GalleryError(f"a person's name must be a non-empty string, got {name!r}")
    if name != name.strip() or any(ord(c) < 32 for c in name):
        raise GalleryError(f"a person's name must not start/end with spaces or hold control characters: {name!r}")
    return name


def _normalise(x, dim: int | None, what: str = "embeddings") -> np.ndarray:
    a = np.asarray(x, dtype=np.float32)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[0] == 0:
        raise GalleryError(f"{what} must be a non-empty (n, D) array, got shape {a.shape}")
    if dim is not None and a.shape[1] != dim:
        raise ModelMismatchError(f"{what} have {a.shape[1]} dimensions but this gallery holds {dim}-d embeddings")
    if not np.all(np.isfinite(a)):
        raise GalleryError(f"{what} contain NaN or infinite values")
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise GalleryError(f"{what} contain an all-zero vector, which has no direction")
    return np.ascontiguousarray(a / norms, dtype=np.float32)


class Gallery:
    """People and their face embeddings in an SQLite file, with exact search.

    Args:
        path: The ``.db`` file (created if missing).
        embedder: Optional object with ``model_id``, ``dim`` and ``embed(images)``, used by
            ``enroll(images=...)`` / ``identify(images=...)`` and to check the model.
        model: The embedder id when you pass embeddings yourself (ignored with ``embedder``).
            Writing or searching with a model other than the stored one raises
            :class:`ModelMismatchError`; ``None`` skips that check (the dimension is still checked).
        backend: ``"auto"`` (faiss when importable, else numpy), ``"faiss"`` or ``"numpy"``.
        cache_index: Keep ``<name>.vectors.safetensors`` beside the database.
        timeout: Seconds to wait for another process's write lock.
        model_source: Where the model comes from (checkpoint path or registry name); stored
            with the first enrolment so tools can rebuild the same embedder later.
    """

    def __init__(self, path: str | os.PathLike, embedder: Embedder | None = None, model: str | None = None,
                 backend: str = "auto", cache_index: bool = True, timeout: float = 30.0,
                 model_source: str | None = None) -> None:
        self.path = Path(path).expanduser()
        self.embedder = embedder
        self.model = embedder.model_id if embedder is not None else model
        self.model_source = model_source
        if backend not in ("auto", "faiss", "numpy"):
            raise ValueError(f"backend must be auto, faiss or numpy, got {backend!r}")
        if backend == "faiss" and not faiss_available():
            raise ImportError("backend='faiss' needs the faiss package (pip install faiss-cpu); "
                              "backend='numpy' gives the same results")
        self.backend = "faiss" if backend == "faiss" or (backend == "auto" and faiss_available()) else "numpy"
        self.cache_index = cache_index
        self._before_commit: Callable[[], None] | None = None  # fault injection point for tests
        self._index = None
        self._index_gen: tuple[str, int] | None = None
        self._check_existing(timeout)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
        try:
            # 16 KiB pages hold seven 512-d float32 rows; at SQLite's default 4 KiB only one
            # ~2.1 KB row fits per page and half the file is padding. Effective only while the
            # file is new (before WAL mode and the first table); a no-op afterwards.
            self._conn.execute("PRAGMA page_size = 16384")
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._conn.execute("PRAGMA synchronous = FULL")
            # Truncate the WAL to 64 MiB after checkpoints (a bulk enrolment can grow it to GBs).
            self._conn.execute("PRAGMA journal_size_limit = 67108864")
            if self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                warnings.warn(f"{self.path}: could not switch to WAL mode; concurrent readers may wait for writers")
            self._init_schema()
        except BaseException:
            self._conn.close()
            raise

    # -- opening ------------------------------------------------------------------------
    def _check_existing(self, timeout: float) -> None:
        """Refuse files that are not our galleries before opening them for writing."""
        if not self.path.exists():
            return
        if self.path.is_dir():
            raise GalleryError(f"gallery path is a folder: {self.path}")
        with open(self.path, "rb") as fh:
            head = fh.read(16)
        if not head:
            return  # an empty file: SQLite treats it as a new database
        if head != _SQLITE_MAGIC:
            raise GalleryError(f"{self.path} is not a visionscale gallery (not an SQLite database); not touched")
        try:
            ro = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout)
        except sqlite3.Error as exc:
            raise GalleryError(f"cannot open {self.path}: {exc}") from None
        try:
            version = ro.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in ro.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as exc:
            raise GalleryError(f"{self.path} is not a readable SQLite database ({exc}); not touched") from None
        finally:
            ro.close()
        if version > SCHEMA_VERSION:
            raise SchemaError(f"{self.path} has gallery schema version {version}, newer than this visionscale "
                              f"understands ({SCHEMA_VERSION}); upgrade visionscale. The file was not modified.")
        if tables and not {"meta", "people", "embeddings"} <= tables:
            raise GalleryError(f"{self.path} is an SQLite database but not a visionscale gallery "
                               f"(tables: {', '.join(sorted(tables))}); not touched")

    def _init_schema(self) -> None:
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            if c.execute("PRAGMA user_version").fetchone()[0] == 0:
                for stmt in _SCHEMA.strip().split(";"):
                    if stmt.strip():
                        c.execute(stmt)
                c.executemany("INSERT INTO meta(key, value) VALUES (?, ?)",
                              [("generation", "0"), ("uuid", uuid.uuid4().hex), ("created", repr(time.time()))])
                c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._conn.close()
        self._index = None

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- meta ---------------------------------------------------------------------------
    def _meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    @property
    def stored_model(self) -> str | None:
        return self._meta("model")

    @property
    def stored_model_source(self) -> str | None:
        """The checkpoint path or registry name recorded at the first enrolment, if any."""
        return self._meta("model_source")

    @property
    def dim(self) -> int | None:
        v = self._meta("dim")
        return int(v) if v is not None else None

    @property
    def generation(self) -> int:
        return int(self._meta("generation") or 0)

    def _check_model(self, dim: int | None = None) -> None:
        stored = self.stored_model
        if stored is not None and self.model is not None and stored != self.model:
            raise ModelMismatchError(f"gallery {self.path} holds embeddings of model {stored!r}; refusing to mix in "
                                     f"{self.model!r} (use a separate gallery per model, or re-enroll)")
        sdim = self.dim
        if sdim is not None and dim is not None and sdim != dim:
            raise ModelMismatchError(f"gallery {self.path} holds {sdim}-d embeddings, got {dim}-d")

    def _write(self, fn: Callable[[sqlite3.Connection], object]) -> object:
        """Run ``fn`` in one write transaction (all or nothing) and bump the generation."""
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            result = fn(c)
            c.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
            if self._before_commit is not None:
                self._before_commit()
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise
        return result

    def _claim_model(self, c: sqlite3.Connection, dim: int) -> None:
        if c.execute("SELECT value FROM meta WHERE key='dim'").fetchone() is None:
            c.execute("INSERT INTO meta(key, value) VALUES ('dim', ?)", (str(dim),))
        if self.model is not None and c.execute("SELECT value FROM meta WHERE key='model'").fetchone() is None:
            c.execute("INSERT INTO meta(key, value) VALUES ('model', ?)", (self.model,))
            if self.model_source is not None:
                c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('model_source', ?)", (self.model_source,))

    def _embed_images(self, images) -> np.ndarray:
        if self.embedder is None:
            raise GalleryError("pass embeddings=..., or open the gallery with an embedder to enroll/identify images")
        return self.embedder.embed(images)

    # -- writing --------------------------------------------------------------------------
    def enroll(self, name: str, embeddings=None, images=None, sources: Sequence[str] | None = None) -> int:
        """Add one or several embeddings (or images, embedded first) of one person.

        A new name creates the person; an existing one gets more embeddings. Returns the
        number added. All of it is one transaction.
        """
        _check_name(name)
        if (embeddings is None) == (images is None):
            raise GalleryError("pass exactly one of embeddings= or images=")
        vecs = _normalise(self._embed_images(images) if images is not None else embeddings, None)
        self._check_model(vecs.shape[1])
        if sources is not None and len(sources) != len(vecs):
            raise GalleryError(f"{len(sources)} sources for {len(vecs)} embeddings")
        now = time.time()

        def tx(c: sqlite3.Connection) -> int:
            self._claim_model(c, vecs.shape[1])
            row = c.execute("SELECT id FROM people WHERE name = ?", (name,)).fetchone()
            pid = row[0] if row else c.execute("INSERT INTO people(name, created) VALUES (?, ?)", (name, now)).lastrowid
            c.executemany("INSERT INTO embeddings(person_id, vector, source, created) VALUES (?, ?, ?, ?)",
                          [(pid, v.astype("<f4").tobytes(), sources[i] if sources else None, now)
                           for i, v in enumerate(vecs)])
            return len(vecs)

        return int(self._write(tx))

    def enroll_many(self, names: Sequence[str], embeddings) -> int:
        """Bulk path: one new person per row of ``embeddings`` ``(n, D)``, in one transaction."""
        vecs = _normalise(embeddings, None)
        if len(names) != len(vecs):
            raise GalleryError(f"{len(names)} names for {len(vecs)} embeddings")
        if len(set(names)) != len(names):
            raise GalleryError("enroll_many needs distinct names (use enroll() for several embeddings each)")
        for n in names:
            _check_name(n)
        self._check_model(vecs.shape[1])
        now = time.time()

        def tx(c: sqlite3.Connection) -> int:
            self._claim_model(c, vecs.shape[1])
            taken = []
            for s in range(0, min(len(names), 10_000), 500):  # large batches rely on UNIQUE below
                chunk = list(names[s:s + 500])
                q = f"SELECT name FROM people WHERE name IN ({','.join('?' * len(chunk))})"
                taken += [n for (n,) in c.execute(q, chunk)]
            if taken:
                raise GalleryError(f"already enrolled: {', '.join(taken[:10])}")
            start = (c.execute("SELECT MAX(id) FROM people").fetchone()[0] or 0) + 1
            c.executemany("INSERT INTO people(id, name, created) VALUES (?, ?, ?)",
                          ((start + i, n, now) for i, n in enumerate(names)))
            c.executemany("INSERT INTO embeddings(person_id, vector, source, created) VALUES (?, ?, NULL, ?)",
                          ((start + i, v.astype("<f4").tobytes(), now) for i, v in enumerate(vecs)))
            return len(vecs)

        try:
            return int(self._write(tx))
        except sqlite3.IntegrityError as exc:
            raise GalleryError(f"bulk enroll failed, nothing was added: {exc}") from None

    def rename(self, old: str, new: str) -> None:
        _check_name(new)

        def tx(c: sqlite3.Connection) -> None:
            if c.execute("SELECT 1 FROM people WHERE name = ?", (new,)).fetchone():
                raise GalleryError(f"cannot rename {old!r} to {new!r}: {new!r} is already enrolled")
            if c.execute("UPDATE people SET name = ? WHERE name = ?", (new, old)).rowcount == 0:
                raise GalleryError(f"no person named {old!r} in {self.path}")

        self._write(tx)

    def remove(self, name: str) -> int:
        """Delete a person and their embeddings; returns how many embeddings went."""

        def tx(c: sqlite3.Connection) -> int:
            row = c.execute("SELECT id FROM people WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise GalleryError(f"no person named {name!r} in {self.path}")
            n = c.execute("SELECT COUNT(*) FROM embeddings WHERE person_id = ?", (row[0],)).fetchone()[0]
            c.execute("DELETE FROM people WHERE id = ?", (row[0],))
            return n

        return int(self._write(tx))

    # -- reading --------------------------------------------------------------------------
    def list(self) -> list[PersonInfo]:
        rows = self._conn.execute(
            "SELECT p.name, COUNT(e.id), p.created FROM people p LEFT JOIN embeddings e ON e.person_id = p.id "
            "GROUP BY p.id ORDER BY p.name").fetchall()
        return [PersonInfo(n, int(k), float(t)) for n, k, t in rows]

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM people").fetchone()[0])

    def __contains__(self, name: str) -> bool:
        return self._conn.execute("SELECT 1 FROM people WHERE name = ?", (name,)).fetchone() is not None

    def embeddings_of(self, name: str) -> np.ndarray:
        rows = self._conn.execute("SELECT e.vector FROM embeddings e JOIN people p ON p.id = e.person_id "
                                  "WHERE p.name = ? ORDER BY e.id", (name,)).fetchall()
        if not rows:
            raise GalleryError(f"no person named {name!r} in {self.path}")
        return np.stack([np.frombuffer(r[0], dtype="<f4") for r in rows]).astype(np.float32)

    # -- index --------------------------------------------------------------------------
    @property
    def cache_path(self) -> Path:
        return self.path.with_name(self.path.name + ".vectors.safetensors")

    def _snapshot(self) -> tuple[str, int, np.ndarray, np.ndarray, np.ndarray]:
        """uuid, generation, ids, person ids, vectors: one consistent read transaction."""
        c = self._conn
        c.execute("BEGIN")
        try:
            uid, gen = self._meta("uuid") or "", self.generation
            if self.cache_index and self.cache_path.is_file():
                cached = self._read_cache(uid, gen)
                if cached is not None:
                    c.execute("COMMIT")
                    return (uid, gen, *cached)
            n = c.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]
            dim = self.dim or 0
            ids = np.empty(n, np.int64)
            pids = np.empty(n, np.int64)
            vecs = np.empty((n, dim), np.float32)
            for i, (eid, pid, blob) in enumerate(c.execute("SELECT id, person_id, vector FROM embeddings ORDER BY id")):
                ids[i], pids[i] = eid, pid
                vecs[i] = np.frombuffer(blob, dtype="<f4")
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise
        if self.cache_index:
            self._write_cache(uid, gen, ids, pids, vecs)
        return uid, gen, ids, pids, vecs

    def _read_cache(self, uid: str, gen: int):
        from safetensors import safe_open

        try:
            with safe_open(str(self.cache_path), framework="numpy") as f:
                meta = f.metadata() or {}
                if meta.get("uuid") != uid or meta.get("generation") != str(gen):
                    return None  # stale: rebuilt from the database
                return f.get_tensor("ids"), f.get_tensor("person_ids"), f.get_tensor("vectors")
        except Exception:  # a damaged cache is only a cache
            return None

    def _write_cache(self, uid: str, gen: int, ids, pids, vecs) -> None:
        from safetensors.numpy import save_file

        from visionscale.io.atomic import atomic_path

        try:
            with atomic_path(self.cache_path) as tmp:
                save_file({"ids": ids, "person_ids": pids, "vectors": vecs}, str(tmp),
                          metadata={"uuid": uid, "generation": str(gen), "model": self.stored_model or ""})
        except OSError as exc:  # read-only folder: search still works from memory
            warnings.warn(f"could not write the index cache {self.cache_path}: {exc}")

    def _ensure_index(self) -> None:
        uid, gen = self._meta("uuid") or "", self.generation
        if self._index is not None and self._index_gen == (uid, gen):
            return
        uid, gen, ids, pids, vecs = self._snapshot()
        if self.backend == "faiss" and len(ids):
            import faiss

            index = faiss.IndexFlatIP(vecs.shape[1])
            index.add(np.ascontiguousarray(vecs))
            store = index  # vectors live inside faiss only (no second copy)
        else:
            store = vecs
        per = np.bincount(np.unique(pids, return_inverse=True)[1]).max() if len(pids) else 0
        self._index = (ids, pids, store, int(per))
        self._index_gen = (uid, gen)

    def rebuild_index(self) -> None:
        """Drop the in-memory index and the cache file; the next search rebuilds both."""
        self._index = None
        self.cache_path.unlink(missing_ok=True)

    def identify(self, embeddings=None, images=None, k: int = 5, threshold: float = 0.5) -> list[Identification]:
        """Nearest enrolled people for each query, best first.

        Args:
            embeddings: ``(n, D)`` queries (normalised here), or
            images: face images, embedded with the gallery's embedder.
            k: How many people to list per query (each person once, by their closest embedding).
            threshold: Known when the closest distance is ``< threshold``, else ``name=None``.
        """
        if (embeddings is None) == (images is None):
            raise GalleryError("pass exactly one of embeddings= or images=")
        if k < 1:
            raise GalleryError(f"k must be at least 1, got {k}")
        q = _normalise(self._embed_images(images) if images is not None else embeddings, None, "queries")
        self._check_model(q.shape[1])
        self._ensure_index()
        ids, pids, store, per = self._index
        if len(ids) == 0:
            return [Identification(None, None, []) for _ in q]
        kk = min(len(ids), k * per)
        if self.backend == "faiss" and not isinstance(store, np.ndarray):
            _, pos = store.search(q, kk)
        else:
            pos = _topk_numpy(store, q, kk)
        results = []
        names = self._names(np.unique(pids[pos[pos >= 0]]))
        for qi, row in enumerate(pos):
            row = row[row >= 0]
            vecs = store[row] if isinstance(store, np.ndarray) else store.reconstruct_batch(row)
            # Exact float64 scores of the candidates: identical whichever backend found them.
            sims = vecs.astype(np.float64) @ q[qi].astype(np.float64)
            order = np.lexsort((ids[row], -sims))
            best: dict[int, float] = {}
            for j in order:
                best.setdefault(int(pids[row[j]]), float(sims[j]))
            matches = []
            for pid, s in list(best.items())[:k]:
                if pid not in names:
                    continue  # removed between the snapshot and now
                matches.append(Match(names[pid], float(np.sqrt(max(0.0, 2.0 - 2.0 * s))), s))
            top = matches[0] if matches else None
            known = top is not None and top.distance < threshold
            results.append(Identification(top.name if known else None, top.distance if top else None, matches))
        return results

    def _names(self, pids: np.ndarray) -> dict[int, str]:
        out: dict[int, str] = {}
        ids = [int(p) for p in pids]
        for s in range(0, len(ids), 500):
            chunk = ids[s:s + 500]
            q = f"SELECT id, name FROM people WHERE id IN ({','.join('?' * len(chunk))})"
            out.update({int(i): n for i, n in self._conn.execute(q, chunk)})
        return out


def _topk_numpy(vecs: np.ndarray, q: np.ndarray, kk: int, chunk: int = 16) -> np.ndarray:
    """Positions of the ``kk`` largest inner products per query (exact), best first."""
    out = np.empty((len(q), kk), np.int64)
    for s in range(0, len(q), chunk):
        scores = q[s:s + chunk] @ vecs.T  # (c, N) float32
        if kk < scores.shape[1]:
            part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        else:
            part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape).copy()
        sc = np.take_along_axis(scores, part, 1)
        order = np.argsort(-sc, axis=1, kind="stable")
        out[s:s + chunk] = np.take_along_axis(part, order, 1)
    return out
