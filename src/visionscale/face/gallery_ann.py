"""Approximate nearest-neighbour indexes for large galleries (faiss), and their file beside the database.

Both metrics search with faiss L2 indexes: cosine galleries store unit vectors, for which L2
order is cosine order. An index returns a few dozen candidates per query; the gallery then
recomputes their distances exactly (float64), so every distance it reports is exact and only
the candidate list is approximate.

Kinds (defaults chosen by measurement, see docs/face_recognition.md, "Large galleries"):

* ``"ivf"``: an inverted file of ``nlist`` k-means cells; codes are 4-bit product quantisation
  scanned with SIMD (faiss "fast scan"), ``nprobe`` cells are visited per query, and the best
  ``rerank`` candidates are re-ranked against the full vectors kept beside the codes
  (``IndexRefineFlat``). Fast to build (k-means on a sample), additions are cheap.
* ``"hnsw"``: a navigable small-world graph over the full vectors (``IndexHNSWFlat``, ``M``
  links, ``efConstruction`` / ``efSearch``). Slower to build; no training.

The file ``<database>.ann.faiss`` is a short header followed by faiss's own serialisation:
``VSANN1\\n``, a little-endian uint32 length, that many bytes of JSON (the gallery's ``uuid/state``
key, kind, parameters, metric, dimension, count and a digest of the indexed rows), the
embedding ids and person ids (int64 each), then ``faiss.write_index``'s bytes. It is written to
a temporary file and renamed, so a reader sees the old file or the complete new one.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

__all__ = ["ANN_THRESHOLD", "AnnParams", "AnnIndex", "AnnFileError", "build", "peek", "read", "write"]

# ``index="auto"`` switches to an approximate index from this many embeddings. Measured on the
# 2-core Xeon (docs/face_recognition.md, "Large galleries"): one exact 128-d query costs ~1.4 ms
# (p95 3.2) at 50k vectors and ~6 ms (p95 6.7) at 100k, over the 5 ms goal; an IVF index over
# 50k vectors builds in seconds and answers in ~0.5 ms.
ANN_THRESHOLD = 50_000
_MAGIC = b"VSANN1\n"
# Fewer rows than this train 8-bit scalar codes instead of product quantisation (whose 16 codes
# per sub-vector want hundreds of training rows).
_MIN_PQ_TRAIN = 1000
# The faiss index file is read and written through Python callbacks in blocks of this size.
_BLOCK = 1 << 22


class AnnFileError(Exception):
    """The index file is unreadable (truncated, damaged, another format); it is rebuilt."""


@dataclass(frozen=True)
class AnnParams:
    """Parameters of an approximate index; ``None`` = chosen from the gallery size at build time.

    Attributes:
        nlist: IVF cells (default ``4 * sqrt(n)`` rounded to a power of two, 64 to 16384; at
            most ``n / 39``, faiss's minimum of training points per cell).
        nprobe: IVF cells visited per query (default ``nlist / 8``, at least 32).
        pq_dims: Dimensions per 4-bit product-quantisation sub-vector (IVF codes).
        m: HNSW links per node.
        ef_construction: HNSW candidate list while building.
        ef_search: HNSW candidate list while searching.
        rerank: Candidates per query re-ranked with exact distances (at least ``k`` x the largest
            number of embeddings of one person).
    """

    nlist: int | None = None
    nprobe: int | None = None
    pq_dims: int = 4
    m: int = 32
    ef_construction: int = 40
    ef_search: int = 128
    rerank: int = 64

    def resolved(self, n: int) -> AnnParams:
        """With the defaults that depend on the number of vectors ``n`` filled in."""
        nlist = self.nlist or int(min(16384, max(64, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))))
        nlist = max(1, min(nlist, n // 39))
        nprobe = min(nlist, self.nprobe or max(32, nlist // 8))
        return AnnParams(**{**asdict(self), "nlist": nlist, "nprobe": nprobe})


@contextmanager
def one_thread_for(nq: int):
    """faiss parallelises a search over queries: with a handful, its other OpenMP threads only
    wait at the barrier, and on a loaded machine that wait costs scheduler slices. Measured on the
    shared 2-core Xeon: one query on a 10k-vector ``IndexFlatL2`` took 88 ms with 2 threads and
    0.23 ms with 1."""
    import faiss

    before = faiss.omp_get_max_threads()
    if nq >= 4 * before or before == 1:
        yield
        return
    faiss.omp_set_num_threads(1)  # this thread's setting only (OpenMP's nthreads-var)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def digest(ids: np.ndarray, pids: np.ndarray, vecs: np.ndarray) -> str:
    """Fingerprint of indexed rows: equal digests of a prefix mean the index covers those rows as they are."""
    h = hashlib.blake2b(digest_size=16)
    for a in (ids.astype("<i8"), pids.astype("<i8"), vecs.astype("<f4")):
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


class AnnIndex:
    """A faiss index over ``vecs`` rows, the row -> (embedding id, person id) map and its header."""

    def __init__(self, index, kind: str, params: AnnParams, metric: str, ids: np.ndarray, pids: np.ndarray,
                 rows_digest: str, key: str | None = None, trained_n: int | None = None) -> None:
        self.index = index
        self.kind = kind
        self.params = params
        self.metric = metric
        self.ids = ids
        self.pids = pids
        self.rows_digest = rows_digest
        self.key = key
        self.trained_n = trained_n if trained_n is not None else len(ids)
        self._configure()

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def set_search_params(self, params: AnnParams) -> None:
        """Take ``params``' search-time settings (``nprobe`` when set, ``ef_search``, ``rerank``);
        the build-time ones (``nlist``, ``m``, ``ef_construction``, ``pq_dims``) stay the index's."""
        self.params = replace(self.params, nprobe=min(params.nprobe or self.params.nprobe, self.params.nlist or 1)
                              if self.kind == "ivf" else self.params.nprobe,
                              ef_search=params.ef_search, rerank=params.rerank)
        self._configure()

    def _configure(self) -> None:
        """Search-time parameters (not all of them survive faiss's serialisation)."""
        import faiss

        if self.kind == "ivf":
            faiss.extract_index_ivf(self.index).nprobe = self.params.nprobe
            self.index.k_factor = 1.0  # search() asks for all the rows to re-rank directly

    def search(self, q: np.ndarray, kk: int) -> np.ndarray:
        """Row positions of up to ``max(kk, rerank)`` candidates per query (-1 pads), nearest first."""
        want = min(len(self), max(kk, self.params.rerank))
        if self.kind == "hnsw":
            import faiss

            hnsw = faiss.downcast_index(self.index)
            hnsw.hnsw.efSearch = max(self.params.ef_search, want)
        with one_thread_for(len(q)):
            _, pos = self.index.search(np.ascontiguousarray(q, dtype=np.float32), want)
        return pos

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The full float32 vectors of ``rows`` (for the exact re-ranking)."""
        return self.index.reconstruct_batch(np.ascontiguousarray(rows, dtype=np.int64))

    def add(self, ids: np.ndarray, pids: np.ndarray, vecs: np.ndarray, rows_digest: str) -> None:
        """Append rows (the gallery's new embeddings, whose ids all follow the indexed ones)."""
        self.index.add(np.ascontiguousarray(vecs, dtype=np.float32))
        self.ids = np.concatenate([self.ids, ids])
        self.pids = np.concatenate([self.pids, pids])
        self.rows_digest = rows_digest

    def header(self) -> dict:
        return {"key": self.key, "kind": self.kind, "params": asdict(self.params), "metric": self.metric,
                "dim": self.dim, "n": len(self), "digest": self.rows_digest, "trained_n": self.trained_n}


def build(kind: str, vecs: np.ndarray, metric: str, params: AnnParams, ids: np.ndarray, pids: np.ndarray,
          rows_digest: str, seed: int = 0) -> AnnIndex:
    """A new index of ``kind`` (``"ivf"`` or ``"hnsw"``) over ``vecs`` (L2; cosine rows are unit vectors)."""
    import faiss

    n, d = vecs.shape
    params = params.resolved(n)
    vecs = np.ascontiguousarray(vecs, dtype=np.float32)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params.m, faiss.METRIC_L2)
        index.hnsw.efConstruction = params.ef_construction
    elif kind == "ivf":
        nlist = params.nlist
        quantizer = faiss.IndexFlatL2(d)
        if d % params.pq_dims == 0 and (d // params.pq_dims) % 2 == 0 and n >= _MIN_PQ_TRAIN:
            base = faiss.IndexIVFPQFastScan(quantizer, d, nlist, d // params.pq_dims, 4, faiss.METRIC_L2)
        else:  # fast scan needs an even number of sub-quantizers and enough rows to train: 8-bit scalar codes
            base = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_L2)
            base.cp.min_points_per_centroid = 1  # tiny galleries: no warning about few points per cell
        base.own_fields = True
        quantizer.this.disown()
        rng = np.random.default_rng(seed)
        sample = vecs if n <= 40 * nlist else vecs[np.sort(rng.choice(n, 40 * nlist, replace=False))]
        base.cp.seed = seed
        base.train(sample)
        index = faiss.IndexRefineFlat(base)
        index.own_fields = True
        base.this.disown()
    else:
        raise ValueError(f"unknown approximate index kind {kind!r}")
    index.add(vecs)
    return AnnIndex(index, kind, params, metric, np.asarray(ids, np.int64), np.asarray(pids, np.int64),
                    rows_digest, trained_n=n)


def write(path: Path, ann: AnnIndex) -> None:
    """Write ``ann`` to ``path`` atomically (temporary file + rename)."""
    import faiss

    from visionscale.io.atomic import atomic_path

    head = json.dumps(ann.header()).encode()
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(_MAGIC + struct.pack("<I", len(head)) + head)
        fh.write(np.ascontiguousarray(ann.ids, "<i8").data)
        fh.write(np.ascontiguousarray(ann.pids, "<i8").data)
        faiss.write_index(ann.index, faiss.PyCallbackIOWriter(fh.write, _BLOCK))


def read_header(fh) -> dict:
    if fh.read(len(_MAGIC)) != _MAGIC:
        raise AnnFileError("not a visionscale index file")
    (size,) = struct.unpack("<I", fh.read(4))
    if size > 1 << 20:
        raise AnnFileError(f"header of {size} bytes")
    try:
        head = json.loads(fh.read(size).decode())
    except ValueError as exc:
        raise AnnFileError(f"damaged header: {exc}") from None
    if not isinstance(head, dict) or not {"key", "kind", "params", "metric", "dim", "n", "digest"} <= set(head):
        raise AnnFileError("incomplete header")
    return head


def peek(path: Path) -> dict:
    """The header of the index file ``path`` (cheap: the index itself is not read)."""
    try:
        with open(path, "rb") as fh:
            return read_header(fh)
    except AnnFileError:
        raise
    except Exception as exc:
        raise AnnFileError(f"{type(exc).__name__}: {exc}") from None


def read(path: Path) -> AnnIndex:
    """The index in ``path``; :class:`AnnFileError` for anything unreadable or inconsistent."""
    import faiss

    try:
        with open(path, "rb") as fh:
            head = read_header(fh)
            n = int(head["n"])
            arrays = []
            for _ in range(2):
                buf = fh.read(8 * n)
                if len(buf) != 8 * n:
                    raise AnnFileError("truncated")
                arrays.append(np.frombuffer(buf, "<i8").astype(np.int64))

            def chunk(size: int) -> bytes:
                return fh.read(size)

            index = faiss.read_index(faiss.PyCallbackIOReader(chunk, _BLOCK))
            if fh.read(1):
                raise AnnFileError("trailing bytes")
        params = AnnParams(**head["params"])
        kind = head["kind"]
        if kind not in ("ivf", "hnsw") or int(index.ntotal) != n or int(index.d) != int(head["dim"]):
            raise AnnFileError("header does not match the index")
        return AnnIndex(index, kind, params, head["metric"], arrays[0], arrays[1], head["digest"], key=head["key"],
                        trained_n=int(head.get("trained_n", n)))
    except AnnFileError:
        raise
    except Exception as exc:  # faiss raises RuntimeError on damaged data; struct/json/TypeError on junk
        raise AnnFileError(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
