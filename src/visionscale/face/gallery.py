"""A persistent face gallery: people, their embeddings, and nearest-neighbour search (exact or approximate).

Storage is one SQLite file (WAL mode, so readers never block the writer and vice versa):

* ``meta`` (key/value): ``model`` (the embedder id, e.g. ``face_embedder_resnet18/512d/<sha>``),
  ``dim``, ``metric`` (``cosine`` or ``euclidean``; absent in older files = ``cosine``),
  ``generation`` (bumped by every change), ``uuid`` and ``state`` (see below);
* ``people`` (id, unique name, created) and ``embeddings`` (id, person id, float32 blob,
  source, created), deleted with their person;
* ``PRAGMA user_version`` = schema version. A file from a newer schema is refused before
  anything is written to it (it is first opened read-only).

Every change is one transaction, so a crash midway (power cut, ``kill -9``) loses that
change only; everything committed before stays. The model, dimension and metric are claimed
and checked inside that transaction, so two processes starting a gallery with different
embedders cannot both succeed; a later embedder with another model id or metric is refused
(:class:`ModelMismatchError`): embedding spaces are never mixed.

Metric: ``cosine`` galleries store L2-normalised vectors and report ``sqrt(2 - 2 cos)``, the
Euclidean distance of the unit vectors; ``euclidean`` galleries (dlib's ResNet descriptor,
same person below 0.6) store vectors as given and report the plain L2 distance. The metric
comes from ``metric=``, else the embedder's ``metric`` attribute (``cosine`` when it has none).

Reading (``read_only=True``: list, identify) opens the file with SQLite's ``mode=ro``: it is
never created or modified (in a writable folder SQLite may leave the empty ``-wal``/``-shm``
companions every WAL reader uses; the next writer removes them), and works on read-only files
and folders. A missing or empty file is an error there; only a writable open creates a gallery.

Search (``index=``): exact by default, with faiss ``IndexFlatIP`` / ``IndexFlatL2`` when the
optional ``faiss`` package is importable, otherwise a numpy matrix product (same maths, same
results up to float rounding of exact ties); from ``ann_threshold`` embeddings (50,000)
``index="auto"`` switches to an approximate faiss IVF index, kept as ``<name>.ann.faiss`` and
keyed like the vector cache below (details in :mod:`visionscale.face.gallery_ann`). Either way
the candidates' distances are recomputed exactly (float64), so reported distances never
depend on the index. Rebuilt whenever another connection committed a change (the approximate
index appends new rows when nothing else changed). The exact index's vectors are cached as
``<name>.vectors.safetensors``, keyed by ``state``: a random token that every Gallery write
renews, in the same transaction as its rows, and that triggers clear when any other program
changes the embeddings. Equal tokens therefore mean equal rows, whatever happened to the file
(a restored backup that was enrolled into again gets a new token); a cache with another token,
or a database without one, is not used. A query is identified as the nearest person when
the distance is below ``threshold``, otherwise as unknown.
"""

from __future__ import annotations

from visionscale.errors import InvalidValueError, MissingDependencyError, VisionscaleError

import functools
import os
import sqlite3
import time
import unicodedata
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
    "METRICS",
    "INDEX_KINDS",
    "faiss_available",
]

SCHEMA_VERSION = 1
METRICS = ("cosine", "euclidean")
INDEX_KINDS = ("auto", "exact", "ivf", "hnsw")
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
# Any change of the embeddings by a program that does not renew ``state`` (the sqlite3 shell,
# an older visionscale) clears it, so an index cache can never be taken for the new rows.
# Created with the schema, and by the first write to a gallery made before they existed.
_TRIGGERS = [f"""CREATE TRIGGER IF NOT EXISTS embeddings_{op.lower()}_clears_state AFTER {op} ON embeddings
WHEN (SELECT value FROM meta WHERE key = 'state') IS NOT ''
BEGIN UPDATE meta SET value = '' WHERE key = 'state'; END""" for op in ("INSERT", "UPDATE", "DELETE")]
MAX_NAME_LENGTH = 1000
# Control characters, surrogates and line/paragraph separators: a name is printed on one line.
_BAD_NAME_CATEGORIES = {"Cc", "Cs", "Zl", "Zp"}


class GalleryError(VisionscaleError, ValueError):
    """Bad gallery file or bad input to a gallery operation."""


class SchemaError(GalleryError):
    """The file was written by a newer (or unknown) gallery schema; it was not modified."""


class ModelMismatchError(GalleryError):
    """Embeddings of a different model, dimension or metric than the gallery's."""


def _database_errors(method):
    """Report SQLite's errors about the file (damaged, locked, not a database, disk full) as
    :class:`GalleryError` naming the gallery; misuse of the sqlite3 API (``ProgrammingError``)
    is a bug and stays as it is."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.ProgrammingError):
                raise
            raise GalleryError(f"gallery {self.path}: {exc}") from exc

    return wrapper


class Embedder(Protocol):
    model_id: str
    dim: int
    # Optional: ``metric`` ("cosine" or "euclidean", read with getattr; "cosine" when absent).

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray: ...


@dataclass(frozen=True)
class Match:
    name: str
    distance: float
    similarity: float  # cosine similarity of the two embeddings (whatever the gallery's metric)


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
    if len(name) > MAX_NAME_LENGTH:
        raise GalleryError(f"a person's name must be at most {MAX_NAME_LENGTH} characters, got {len(name)}")
    if name != name.strip() or any(unicodedata.category(c) in _BAD_NAME_CATEGORIES for c in name):
        raise GalleryError(f"a person's name must not start/end with spaces or hold control characters, "
                           f"line breaks or lone surrogates: {name!r}")
    return name


def _read_only_uri(path: Path) -> str:
    """SQLite URI that reads ``path`` without writing it.

    A WAL database is read through its ``-shm`` file, which SQLite creates beside it when it can.
    In a folder we cannot write, without those files, no process can be writing either, so the
    file is opened ``immutable``; a non-empty ``-wal`` there holds commits that only a writable
    open can replay, which is refused rather than silently read without them.
    """
    path = path.absolute()
    uri = f"{path.as_uri()}?mode=ro"
    if os.access(path.parent, os.W_OK | os.X_OK):
        return uri
    wal, shm = Path(f"{path}-wal"), Path(f"{path}-shm")
    if wal.exists() and shm.exists():
        return uri
    if wal.exists() and wal.stat().st_size > 0:
        raise GalleryError(f"cannot read {path} in a read-only folder: its write-ahead log {wal} holds changes "
                           f"that need {shm.name} to be read; open it once where the folder is writable")
    return uri + "&immutable=1"


def _stored_metric(metric: str | None, dim: str | None) -> str | None:
    """The meta table's metric; a gallery that holds a dimension but no metric predates metrics: cosine."""
    return metric if metric is not None else ("cosine" if dim is not None else None)


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise InvalidValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}").about("metric")
    return metric


def _prepare(x, dim: int | None, metric: str, what: str = "embeddings") -> np.ndarray:
    """``(n, D)`` float32 rows as the gallery stores and searches them: L2-normalised for
    ``cosine``, as given for ``euclidean``."""
    a = np.asarray(x, dtype=np.float32)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[0] == 0:
        raise GalleryError(f"{what} must be a non-empty (n, D) array, got shape {a.shape}")
    if dim is not None and a.shape[1] != dim:
        raise ModelMismatchError(f"{what} have {a.shape[1]} dimensions but this gallery holds {dim}-d embeddings")
    if not np.all(np.isfinite(a)):
        raise GalleryError(f"{what} contain NaN or infinite values")
    if metric == "euclidean":
        return np.ascontiguousarray(a)
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise GalleryError(f"{what} contain an all-zero vector, which has no direction")
    return np.ascontiguousarray(a / norms, dtype=np.float32)


class Gallery:
    """People and their face embeddings in an SQLite file, with exact search.

    Args:
        path: The ``.db`` file (created if missing, unless ``read_only`` or ``create=False``).
        embedder: Optional object with ``model_id``, ``dim`` and ``embed(images)``, used by
            ``enroll(images=...)`` / ``identify(images=...)`` and to check the model.
        model: The embedder id when you pass embeddings yourself (ignored with ``embedder``).
            Writing or searching with a model other than the stored one raises
            :class:`ModelMismatchError`; ``None`` skips that check (the dimension is still checked).
        metric: ``"cosine"`` (vectors L2-normalised, distance ``sqrt(2 - 2 cos)``) or
            ``"euclidean"`` (vectors stored as given, plain L2 distance; dlib's descriptor).
            ``None``: the embedder's ``metric`` attribute (``"cosine"`` when it has none), or
            without an embedder the stored metric (``"cosine"`` for a new gallery). Claimed with
            the model at the first enrolment; a different one raises :class:`ModelMismatchError`.
        backend: Exact search: ``"auto"`` (faiss when importable, else numpy), ``"faiss"`` or ``"numpy"``.
        index: ``"exact"``, ``"ivf"`` / ``"hnsw"`` (approximate faiss indexes, candidates re-ranked
            exactly) or ``"auto"``: exact below ``ann_threshold`` embeddings, ``"ivf"`` from
            there on (exact when faiss is missing). See :mod:`visionscale.face.gallery_ann`.
        ann_threshold: Embeddings from which ``index="auto"`` goes approximate.
        ann_params: :class:`visionscale.face.gallery_ann.AnnParams` (cells, probes, links, re-ranked
            candidates); the measured defaults when None.
        cache_index: Keep ``<name>.vectors.safetensors`` (exact search) and ``<name>.ann.faiss``
            (approximate) beside the database (when that folder is writable).
        timeout: Seconds to wait for another process's write lock.
        model_source: Where the model comes from (checkpoint path or registry name); stored
            with the first enrolment so tools can rebuild the same embedder later.
        read_only: Open for reading only (SQLite ``mode=ro``): the file is never created or
            modified, works on read-only files and folders; writes raise :class:`GalleryError`.
        create: With ``False``, a missing or empty file is an error instead of a new gallery.
    """

    def __init__(self, path: str | os.PathLike, embedder: Embedder | None = None, model: str | None = None,
                 backend: str = "auto", cache_index: bool = True, timeout: float = 30.0,
                 model_source: str | None = None, read_only: bool = False, create: bool = True,
                 metric: str | None = None, index: str = "auto", ann_threshold: int | None = None,
                 ann_params=None) -> None:
        from visionscale.face import gallery_ann

        self.path = Path(path).expanduser()
        self.embedder = embedder
        self.model = embedder.model_id if embedder is not None else model
        self.model_source = model_source
        if metric is None and embedder is not None:
            metric = getattr(embedder, "metric", "cosine")
        self.requested_metric = _check_metric(metric) if metric is not None else None
        if index not in INDEX_KINDS:
            raise InvalidValueError(f"index must be one of {', '.join(INDEX_KINDS)}, got {index!r}").about("index")
        if index in ("ivf", "hnsw") and not faiss_available():
            raise MissingDependencyError(f"index={index!r} needs the faiss package (pip install faiss-cpu); "
                                         f"index='exact' needs nothing").about("index")
        self.index_kind = index
        self.ann_params = ann_params if ann_params is not None else gallery_ann.AnnParams()
        self.ann_threshold = gallery_ann.ANN_THRESHOLD if ann_threshold is None else int(ann_threshold)
        if self.ann_threshold < 1:
            raise InvalidValueError(f"ann_threshold must be >= 1, got {ann_threshold}").about("ann_threshold")
        if backend not in ("auto", "faiss", "numpy"):
            raise InvalidValueError(f"backend must be auto, faiss or numpy, got {backend!r}").about("backend")
        if backend == "faiss" and not faiss_available():
            raise MissingDependencyError("backend='faiss' needs the faiss package (pip install faiss-cpu); "
                                         "backend='numpy' gives the same results").about("backend")
        self.backend = "faiss" if backend == "faiss" or (backend == "auto" and faiss_available()) else "numpy"
        self.cache_index = cache_index
        self.read_only = read_only
        self._before_commit: Callable[[], None] | None = None  # fault injection point for tests
        self._index = None
        self._index_version: tuple[int, int] | None = None
        self._writes = 0  # commits by this connection (PRAGMA data_version counts the others')
        self._triggers_checked = False
        if read_only:
            self._conn = self._open_read_only(timeout)
            return
        self._check_existing(timeout, create)
        self._check_writable()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise GalleryError(f"cannot open gallery {self.path} for writing: {exc}") from None
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
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            if isinstance(exc, sqlite3.ProgrammingError):
                raise
            raise GalleryError(f"cannot open gallery {self.path} for writing: {exc}") from None
        except BaseException:
            self._conn.close()
            raise

    # -- opening ------------------------------------------------------------------------
    def _head(self, create: bool) -> bytes | None:
        """The file's first bytes (None when missing); refuses folders, and unless ``create``
        missing or empty files."""
        if not self.path.exists():
            if not create:
                raise GalleryError(f"gallery not found: {self.path}")
            return None
        if self.path.is_dir():
            raise GalleryError(f"gallery path is a folder: {self.path}")
        with open(self.path, "rb") as fh:
            head = fh.read(16)
        if not head and not create:
            raise GalleryError(f"gallery {self.path} is empty (0 bytes): no one was enrolled into it yet")
        if head and head != _SQLITE_MAGIC:
            raise GalleryError(f"{self.path} is not a visionscale gallery (not an SQLite database); not touched")
        return head

    def _inspect(self, conn: sqlite3.Connection) -> None:
        """Refuse a newer schema or someone else's SQLite database (on a read-only connection)."""
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as exc:
            raise GalleryError(f"{self.path} is not a readable SQLite database ({exc}); not touched") from None
        if version > SCHEMA_VERSION:
            raise SchemaError(f"{self.path} has gallery schema version {version}, newer than this visionscale "
                              f"understands ({SCHEMA_VERSION}); upgrade visionscale. The file was not modified.")
        if tables and not {"meta", "people", "embeddings"} <= tables:
            raise GalleryError(f"{self.path} is an SQLite database but not a visionscale gallery "
                               f"(tables: {', '.join(sorted(tables))}); not touched")
        if not tables and self.read_only:
            raise GalleryError(f"gallery {self.path} is an empty SQLite database: no one was enrolled into it yet")

    def _connect_read_only(self, timeout: float) -> sqlite3.Connection:
        try:
            return sqlite3.connect(_read_only_uri(self.path), uri=True, timeout=timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise GalleryError(f"cannot open {self.path}: {exc}") from None

    def _open_read_only(self, timeout: float) -> sqlite3.Connection:
        self._head(create=False)
        conn = self._connect_read_only(timeout)
        try:
            self._inspect(conn)
            conn.execute("PRAGMA query_only = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_existing(self, timeout: float, create: bool) -> None:
        """Refuse files that are not our galleries before opening them for writing."""
        if not self._head(create):
            return  # missing or empty: SQLite makes a new database
        ro = self._connect_read_only(timeout)
        try:
            self._inspect(ro)
        finally:
            ro.close()

    def _check_writable(self) -> None:
        from visionscale.io.outputs import check_writable_dir

        if self.path.exists() and not os.access(self.path, os.W_OK):
            raise GalleryError(f"cannot write gallery {self.path}: the file is read-only")
        check_writable_dir(self.path.parent, what=f"folder of gallery {self.path}")

    def _init_schema(self) -> None:
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            if c.execute("PRAGMA user_version").fetchone()[0] == 0:
                for stmt in _SCHEMA.strip().split(";"):
                    if stmt.strip():
                        c.execute(stmt)
                for stmt in _TRIGGERS:
                    c.execute(stmt)
                c.executemany("INSERT INTO meta(key, value) VALUES (?, ?)",
                              [("generation", "0"), ("uuid", uuid.uuid4().hex), ("created", repr(time.time())),
                               ("state", uuid.uuid4().hex)])
                c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self._triggers_checked = True
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
    @_database_errors
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
    def stored_metric(self) -> str | None:
        """The metric claimed at the first enrolment; a gallery from before metrics existed is cosine."""
        return _stored_metric(self._meta("metric"), self._meta("dim"))

    @property
    def metric(self) -> str:
        """The metric searches use: the stored one, else the requested one, else cosine."""
        return self.stored_metric or self.requested_metric or "cosine"

    @property
    def generation(self) -> int:
        return int(self._meta("generation") or 0)

    def _mismatch(self, stored_model: str | None, stored_dim: str | None, dim: int | None,
                  stored_metric: str | None = None, metric: str | None = None) -> None:
        if stored_model is not None and self.model is not None and stored_model != self.model:
            raise ModelMismatchError(f"gallery {self.path} holds embeddings of model {stored_model!r}; refusing to "
                                     f"mix in {self.model!r} (use a separate gallery per model, or re-enroll)")
        if stored_dim is not None and dim is not None and int(stored_dim) != dim:
            raise ModelMismatchError(f"gallery {self.path} holds {stored_dim}-d embeddings, got {dim}-d")
        metric = metric or self.requested_metric
        if stored_metric is not None and metric is not None and stored_metric != metric:
            raise ModelMismatchError(f"gallery {self.path} compares embeddings by {stored_metric} distance; refusing "
                                     f"to mix in {metric} ones (use a separate gallery per model and metric)")

    def _check_model(self, dim: int | None = None) -> None:
        """Early check, before a write transaction (which checks again: see ``_claim_model``)."""
        stored = dict(self._conn.execute("SELECT key, value FROM meta WHERE key IN ('model', 'dim', 'metric')"))
        self._mismatch(stored.get("model"), stored.get("dim"), dim,
                       _stored_metric(stored.get("metric"), stored.get("dim")))

    def _write(self, fn: Callable[[sqlite3.Connection], object]) -> object:
        """Run ``fn`` in one write transaction (all or nothing), bump the generation and renew the state."""
        if self.read_only:
            raise GalleryError(f"gallery {self.path} was opened read-only; open it for writing to change it")
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            if not self._triggers_checked:  # a gallery made before the triggers existed
                for stmt in _TRIGGERS:
                    c.execute(stmt)
            result = fn(c)
            c.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
            c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('state', ?)", (uuid.uuid4().hex,))
            if self._before_commit is not None:
                self._before_commit()
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise
        self._triggers_checked = True
        self._writes += 1
        return result

    def _claim_model(self, c: sqlite3.Connection, dim: int, metric: str) -> None:
        """Check the stored model, dimension and metric and claim them if unset, inside the write
        transaction: another process may have claimed them since ``_check_model``. ``metric`` is
        the one the new vectors were prepared for."""
        stored = dict(c.execute("SELECT key, value FROM meta WHERE key IN ('model', 'dim', 'metric')").fetchall())
        self._mismatch(stored.get("model"), stored.get("dim"), dim,
                       _stored_metric(stored.get("metric"), stored.get("dim")), metric)
        if "dim" not in stored:
            c.execute("INSERT INTO meta(key, value) VALUES ('dim', ?)", (str(dim),))
        if "metric" not in stored:
            c.execute("INSERT INTO meta(key, value) VALUES ('metric', ?)", (metric,))
        if self.model is not None and "model" not in stored:
            c.execute("INSERT INTO meta(key, value) VALUES ('model', ?)", (self.model,))
            if self.model_source is not None:
                c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('model_source', ?)", (self.model_source,))

    def _embed_images(self, images) -> np.ndarray:
        if self.embedder is None:
            raise GalleryError("pass embeddings=..., or open the gallery with an embedder to enroll/identify images")
        return self.embedder.embed(images)

    # -- writing --------------------------------------------------------------------------
    @_database_errors
    def enroll(self, name: str, embeddings=None, images=None, sources: Sequence[str] | None = None) -> int:
        """Add one or several embeddings (or images, embedded first) of one person.

        A new name creates the person; an existing one gets more embeddings. Returns the
        number added. All of it is one transaction.
        """
        _check_name(name)
        if (embeddings is None) == (images is None):
            raise GalleryError("pass exactly one of embeddings= or images=")
        raw = np.asarray(self._embed_images(images) if images is not None else embeddings, dtype=np.float32)
        self._check_model(raw.shape[-1] if raw.ndim else None)
        metric = self.metric
        vecs = _prepare(raw, None, metric)
        if sources is not None and len(sources) != len(vecs):
            raise GalleryError(f"{len(sources)} sources for {len(vecs)} embeddings")
        now = time.time()

        def tx(c: sqlite3.Connection) -> int:
            self._claim_model(c, vecs.shape[1], metric)
            row = c.execute("SELECT id FROM people WHERE name = ?", (name,)).fetchone()
            pid = row[0] if row else c.execute("INSERT INTO people(name, created) VALUES (?, ?)", (name, now)).lastrowid
            c.executemany("INSERT INTO embeddings(person_id, vector, source, created) VALUES (?, ?, ?, ?)",
                          [(pid, v.astype("<f4").tobytes(), sources[i] if sources else None, now)
                           for i, v in enumerate(vecs)])
            return len(vecs)

        return int(self._write(tx))

    @_database_errors
    def enroll_many(self, names: Sequence[str], embeddings) -> int:
        """Bulk path: one new person per row of ``embeddings`` ``(n, D)``, in one transaction."""
        raw = np.asarray(embeddings, dtype=np.float32)
        self._check_model(raw.shape[-1] if raw.ndim else None)
        metric = self.metric
        vecs = _prepare(raw, None, metric)
        if len(names) != len(vecs):
            raise GalleryError(f"{len(names)} names for {len(vecs)} embeddings")
        if len(set(names)) != len(names):
            raise GalleryError("enroll_many needs distinct names (use enroll() for several embeddings each)")
        for n in names:
            _check_name(n)
        now = time.time()

        def tx(c: sqlite3.Connection) -> int:
            self._claim_model(c, vecs.shape[1], metric)
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

    @_database_errors
    def rename(self, old: str, new: str) -> None:
        _check_name(new)

        def tx(c: sqlite3.Connection) -> None:
            if c.execute("SELECT 1 FROM people WHERE name = ?", (new,)).fetchone():
                raise GalleryError(f"cannot rename {old!r} to {new!r}: {new!r} is already enrolled")
            if c.execute("UPDATE people SET name = ? WHERE name = ?", (new, old)).rowcount == 0:
                raise GalleryError(f"no person named {old!r} in {self.path}")

        self._write(tx)

    @_database_errors
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
    @_database_errors
    def list(self) -> list[PersonInfo]:
        rows = self._conn.execute(
            "SELECT p.name, COUNT(e.id), p.created FROM people p LEFT JOIN embeddings e ON e.person_id = p.id "
            "GROUP BY p.id ORDER BY p.name").fetchall()
        return [PersonInfo(n, int(k), float(t)) for n, k, t in rows]

    @_database_errors
    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM people").fetchone()[0])

    @_database_errors
    def __contains__(self, name: str) -> bool:
        return self._conn.execute("SELECT 1 FROM people WHERE name = ?", (name,)).fetchone() is not None

    @_database_errors
    def embeddings_of(self, name: str) -> np.ndarray:
        rows = self._conn.execute("SELECT e.vector FROM embeddings e JOIN people p ON p.id = e.person_id "
                                  "WHERE p.name = ? ORDER BY e.id", (name,)).fetchall()
        if not rows:
            raise GalleryError(f"no person named {name!r} in {self.path}")
        return np.stack([np.frombuffer(r[0], dtype="<f4") for r in rows]).astype(np.float32)

    def distance(self, name: str, embedding) -> float:
        """Distance of ``embedding`` to ``name`` as :meth:`identify` measures it: to the closest
        of that person's embeddings, Euclidean for a ``euclidean`` gallery, ``sqrt(2 - 2 cos)``
        for a ``cosine`` one (float64).

        Raises:
            GalleryError: No such person, or a bad embedding (shape, dimension, NaN, all zero).
        """
        metric = self.metric
        e = _prepare(np.ravel(embedding), self.dim, metric, "the embedding")[0].astype(np.float64)  # as identify's
        vecs = self.embeddings_of(name).astype(np.float64)
        if metric == "euclidean":
            return float(np.sqrt(max(0.0, float(((vecs - e) ** 2).sum(1).min()))))
        return float(np.sqrt(max(0.0, 2.0 - 2.0 * float(np.max(vecs @ e)))))

    # -- index --------------------------------------------------------------------------
    @property
    def cache_path(self) -> Path:
        return self.path.with_name(self.path.name + ".vectors.safetensors")

    @property
    def ann_path(self) -> Path:
        """The approximate index's file (see :mod:`visionscale.face.gallery_ann`)."""
        return self.path.with_name(self.path.name + ".ann.faiss")

    def _key(self) -> str | None:
        """``uuid/state``: names the rows' version; None when unknown (changed by another program)."""
        uid, state = self._meta("uuid") or "", self._meta("state") or ""
        return f"{uid}/{state}" if uid and state else None

    def _snapshot(self, write_cache: bool = True) -> tuple[str | None, np.ndarray, np.ndarray, np.ndarray]:
        """key, ids, person ids, vectors, from the cache when its state is the database's (one read transaction)."""
        c = self._conn
        c.execute("BEGIN")
        try:
            key = self._key()
            dim = self.dim
            if key is not None and self.cache_index and self.cache_path.is_file():
                cached = self._read_cache(key, dim)
                if cached is not None:
                    c.execute("COMMIT")
                    return (key, *cached)
            n = c.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]
            if n and dim is None:
                raise GalleryError(f"{self.path} holds embeddings but no dimension in its meta table; "
                                   f"the file was edited or damaged")
            ids = np.empty(n, np.int64)
            pids = np.empty(n, np.int64)
            vecs = np.empty((n, dim or 0), np.float32)
            for i, (eid, pid, blob) in enumerate(c.execute("SELECT id, person_id, vector FROM embeddings ORDER BY id")):
                if not isinstance(blob, bytes) or len(blob) != 4 * dim:
                    size = f"{len(blob)} bytes" if isinstance(blob, bytes) else f"a {type(blob).__name__}"
                    raise GalleryError(f"{self.path}: embedding {eid} is {size}, not {dim} float32 values "
                                       f"(the gallery's dimension); the file was edited or damaged")
                ids[i], pids[i] = eid, pid
                vecs[i] = np.frombuffer(blob, dtype="<f4")
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise
        if key is not None and self.cache_index and write_cache:
            self._write_cache(key, ids, pids, vecs)
        return key, ids, pids, vecs

    def _read_cache(self, key: str, dim: int | None):
        from safetensors import safe_open

        try:
            with safe_open(str(self.cache_path), framework="numpy") as f:
                if (f.metadata() or {}).get("state") != key:
                    return None  # other rows (another version, a restored backup): rebuilt from the database
                ids, pids, vecs = f.get_tensor("ids"), f.get_tensor("person_ids"), f.get_tensor("vectors")
        except Exception:  # a damaged cache is only a cache
            return None
        if not (ids.ndim == pids.ndim == 1 and vecs.ndim == 2 and len(ids) == len(pids) == len(vecs)
                and vecs.shape[1] == (dim or 0) and vecs.dtype == np.float32):
            return None
        return ids.astype(np.int64), pids.astype(np.int64), vecs

    def _write_cache(self, key: str, ids, pids, vecs) -> None:
        from safetensors.numpy import save_file

        from visionscale.io.atomic import atomic_path

        if not os.access(self.cache_path.absolute().parent, os.W_OK | os.X_OK):
            return  # a read-only folder: search works from memory, and nothing is written there
        try:
            with atomic_path(self.cache_path) as tmp:
                save_file({"ids": ids, "person_ids": pids, "vectors": vecs}, str(tmp),
                          metadata={"state": key, "model": self.stored_model or ""})
        except OSError as exc:
            warnings.warn(f"could not write the index cache {self.cache_path}: {exc}")

    def _version(self) -> tuple[int, int]:
        """Changes since the index was built: commits by other connections, and by this one."""
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0]), self._writes

    def _kind(self) -> str:
        """The index to use now: ``index``, or for ``"auto"`` exact below ``ann_threshold`` embeddings."""
        if self.index_kind != "auto":
            return self.index_kind
        if not faiss_available():
            return "exact"
        n = self._conn.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]
        return "ivf" if n >= self.ann_threshold else "exact"

    @property
    def active_index(self) -> str:
        """The index the last search used (``"exact"``, ``"ivf"``, ``"hnsw"``), or the one the next would."""
        return self._index.kind if self._index is not None else self._kind()

    def _ensure_index(self) -> None:
        version = self._version()
        if self._index is not None and self._index_version == version:
            return
        metric = self.metric
        kind = self._kind()
        if kind == "exact":
            _, ids, pids, vecs = self._snapshot()
            self._index = _ExactIndex(ids, pids, vecs, metric, self.backend == "faiss")
        else:
            self._index = _AnnSearch(self._ann(kind, metric))
        self._index_version = version

    def _ann(self, kind: str, metric: str):
        """The approximate index: from its file when that holds the database's current rows,
        else brought up to date (new rows added) or rebuilt, and written back."""
        from visionscale.face import gallery_ann

        def usable(a) -> bool:  # the same kind of index over the same kind of vectors
            return a is not None and a.kind == kind and a.metric == metric and a.dim == (self.dim or 0)

        # The base to bring up to date: the index in memory, else the file's; the file is read
        # when it is the only base or already holds the current rows (another process updated it).
        current = self._index.ann if isinstance(self._index, _AnnSearch) else None
        old = current if usable(current) else None
        key_now = self._key()
        if self.cache_index and self.ann_path.is_file() and (old is None or old.key != key_now):
            try:
                if old is None or gallery_ann.peek(self.ann_path).get("key") == key_now:
                    loaded = gallery_ann.read(self.ann_path)
                    old = loaded if usable(loaded) else old  # another kind or gallery: not used
            except (gallery_ann.AnnFileError, OSError) as exc:
                warnings.warn(f"unreadable approximate index {self.ann_path} ({exc}); rebuilding it")
        if old is not None:
            c = self._conn
            c.execute("BEGIN")  # the key and the count of one version
            try:
                fresh = old.key is not None and old.key == self._key() and len(old) == \
                    c.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]
            finally:
                c.execute("COMMIT")
            if fresh:
                old.set_search_params(self.ann_params)
                return old
        key, ids, pids, vecs = self._snapshot(write_cache=False)
        if len(ids) == 0:
            return None
        rows = gallery_ann.digest(ids, pids, vecs)
        m = len(old) if old is not None else 0
        if (old is not None and 0 < m <= len(ids) and len(ids) <= 4 * old.trained_n and np.array_equal(old.ids, ids[:m])
                and gallery_ann.digest(ids[:m], pids[:m], vecs[:m]) == old.rows_digest):
            old.add(ids[m:], pids[m:], vecs[m:], rows)  # only additions since: append them
            ann = old
        else:
            old = None  # free it before building the new one
            ann = gallery_ann.build(kind, vecs, metric, self.ann_params, ids, pids, rows)
        del vecs
        ann.key = key
        ann.set_search_params(self.ann_params)
        if key is not None and self.cache_index and os.access(self.ann_path.absolute().parent, os.W_OK | os.X_OK):
            try:
                gallery_ann.write(self.ann_path, ann)
            except OSError as exc:
                warnings.warn(f"could not write the approximate index {self.ann_path}: {exc}")
        return ann

    def rebuild_index(self) -> None:
        """Drop the in-memory index and the cache files; the next search rebuilds them."""
        self._index = None
        self.cache_path.unlink(missing_ok=True)
        self.ann_path.unlink(missing_ok=True)

    @_database_errors
    def identify(self, embeddings=None, images=None, k: int = 5, threshold: float | None = None) -> list[Identification]:
        """Nearest enrolled people for each query, best first.

        Args:
            embeddings: ``(n, D)`` queries (normalised here for a cosine gallery), or
            images: face images, embedded with the gallery's embedder.
            k: How many people to list per query (each person once, by their closest embedding).
            threshold: Known when the closest distance is ``< threshold``, else ``name=None``;
                default: the embedder's ``default_threshold``, else 0.6 for a euclidean gallery
                (dlib's) and 0.5 for a cosine one (seed 003's).
        """
        if threshold is None:
            threshold = getattr(self.embedder, "default_threshold", None)
            if threshold is None:
                threshold = 0.6 if self.metric == "euclidean" else 0.5
        if (embeddings is None) == (images is None):
            raise GalleryError("pass exactly one of embeddings= or images=")
        if k < 1:
            raise GalleryError(f"k must be at least 1, got {k}")
        raw = np.asarray(self._embed_images(images) if images is not None else embeddings, dtype=np.float32)
        self._check_model(raw.shape[-1] if raw.ndim else None)
        metric = self.metric
        q = _prepare(raw, None, metric, "queries")
        self._ensure_index()
        index = self._index
        if index.n == 0:
            return [Identification(None, None, []) for _ in q]
        ids, pids = index.ids, index.pids
        pos = index.candidates(q, min(index.n, k * index.per))
        results = []
        names = self._names(np.unique(pids[pos[pos >= 0]]))
        for qi, row in enumerate(pos):
            row = row[row >= 0]
            # Exact float64 distances of the candidates: identical whichever index found them.
            vecs = index.vectors(row).astype(np.float64)
            qq = q[qi].astype(np.float64)
            sims = vecs @ qq
            if metric == "cosine":
                dists = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * sims))
                order = np.lexsort((ids[row], -sims))
            else:
                dists = np.sqrt(np.maximum(0.0, ((vecs - qq) ** 2).sum(1)))
                sims = sims / np.maximum(np.linalg.norm(vecs, axis=1) * np.linalg.norm(qq), 1e-300)
                order = np.lexsort((ids[row], dists))
            best: dict[int, tuple[float, float]] = {}
            for j in order:
                best.setdefault(int(pids[row[j]]), (float(dists[j]), float(sims[j])))
            matches = []
            for pid, (d, s) in list(best.items())[:k]:
                if pid not in names:
                    continue  # removed between the snapshot and now
                matches.append(Match(names[pid], d, s))
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


def _topk_numpy(vecs: np.ndarray, q: np.ndarray, kk: int, half_sqnorm: np.ndarray | None = None,
                chunk: int = 16) -> np.ndarray:
    """Positions of the ``kk`` largest inner products per query (minus ``half_sqnorm``: nearest
    in L2), exact, best first."""
    out = np.empty((len(q), kk), np.int64)
    for s in range(0, len(q), chunk):
        scores = q[s:s + chunk] @ vecs.T  # (c, N) float32
        if half_sqnorm is not None:
            scores -= half_sqnorm
        if kk < scores.shape[1]:
            part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        else:
            part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape).copy()
        sc = np.take_along_axis(scores, part, 1)
        order = np.argsort(-sc, axis=1, kind="stable")
        out[s:s + chunk] = np.take_along_axis(part, order, 1)
    return out


def _most_per_person(pids: np.ndarray) -> int:
    return int(np.bincount(np.unique(pids, return_inverse=True)[1]).max()) if len(pids) else 0


class _ExactIndex:
    """Exact search: faiss ``IndexFlatIP`` / ``IndexFlatL2`` or a numpy matrix product."""

    kind = "exact"

    def __init__(self, ids: np.ndarray, pids: np.ndarray, vecs: np.ndarray, metric: str, use_faiss: bool) -> None:
        self.ids, self.pids, self.n = ids, pids, len(ids)
        self.per = _most_per_person(pids)
        self.half_sqnorm = None
        if use_faiss and self.n:
            import faiss

            store = (faiss.IndexFlatIP if metric == "cosine" else faiss.IndexFlatL2)(vecs.shape[1])
            store.add(np.ascontiguousarray(vecs))
            self.store = store  # vectors live inside faiss only (no second copy)
        else:
            self.store = vecs
            if metric == "euclidean":
                # ||q - v||^2 = ||q||^2 - 2 (q.v - ||v||^2 / 2): the largest q.v - ||v||^2 / 2 is the nearest.
                self.half_sqnorm = 0.5 * np.einsum("ij,ij->i", vecs, vecs)

    def candidates(self, q: np.ndarray, kk: int) -> np.ndarray:
        if isinstance(self.store, np.ndarray):
            return _topk_numpy(self.store, q, kk, self.half_sqnorm)
        from visionscale.face.gallery_ann import one_thread_for

        with one_thread_for(len(q)):
            return self.store.search(q, kk)[1]

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        return self.store[rows] if isinstance(self.store, np.ndarray) else self.store.reconstruct_batch(rows)


class _AnnSearch:
    """An approximate index (:class:`visionscale.face.gallery_ann.AnnIndex`) behind the same interface."""

    def __init__(self, ann) -> None:
        self.ann = ann
        self.kind = ann.kind if ann is not None else "exact"
        self.ids = ann.ids if ann is not None else np.empty(0, np.int64)
        self.pids = ann.pids if ann is not None else np.empty(0, np.int64)
        self.n = len(self.ids)
        self.per = _most_per_person(self.pids)

    def candidates(self, q: np.ndarray, kk: int) -> np.ndarray:
        return self.ann.search(q, kk)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        return self.ann.vectors(rows)
