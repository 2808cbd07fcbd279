"""PatchCore inference graph: patch features, memory-bank nearest neighbours, score maps.

Paper: Roth, Pemula, Zepeda, Schölkopf, Brox, Gehler, "Towards Total Recall in Industrial
Anomaly Detection", CVPR 2022 (arXiv:2106.08265).
Official code: github.com/amazon-science/patchcore-inspection (``src/patchcore/patchcore.py``,
``common.py``). anomalib's ``PatchcoreModel`` (github.com/openvinotoolkit/anomalib) was used
as a second reading of the paper's Eq. 7.

Only inference is here: the memory bank is a random buffer of the size a 10% coreset of
``num_train_images`` training images would have (PatchCore-10); ``set_memory_bank`` puts a
real one in.

The search API (used by :class:`MemoryBankSearch`, reusable on its own):

* ``nearest_neighbors(queries, bank, k=1, max_chunk_bytes=..., use_faiss=False, *,
  stats=None, refine=True) -> (dist, idx)``: exact k-NN in L2, in bounded memory, on any
  device including ``meta``.
* ``bank_stats(bank, max_chunk_bytes=...) -> BankStats(mean, sq)``: what the search
  precomputes per bank; pass it as ``stats`` to search one bank many times.
* ``choose_search(bank, sample_queries, k=1, *, repeats=2, backends=None, timer=...) ->
  {"backend", "reason", "probe_ms", "probe_rows"}``: the faster of torch and faiss for
  this bank on this machine, by timing both (torch off the CPU or without faiss).
* ``PatchCoreConfig.search`` / ``MemoryBankSearch(search=...)``: ``"auto"`` (probe on the
  first batch, or eagerly with ``model.nn_search.choose()``), ``"torch"`` or ``"faiss"``;
  the decision and its timings are in ``model.nn_search.search_choice``.

Where this differs from the official code (on purpose, and why):

* Patch aggregation. The official ``PatchMaker`` unfolds every 3x3 neighbourhood into a
  ``C*9`` vector and its ``MeanMapper`` adaptive-average-pools that flat ``(C, 3, 3)``
  vector to ``pretrain_embed_dim``. We take the paper's description instead (Eq. 2, an
  average over the neighbourhood): 3x3 average pooling (zero padding counted, as with the
  official zero-padded unfold) and then adaptive average pooling over channels. This
  never builds the 9x larger unfolded tensor. Whenever ``pretrain_embed_dim`` divides
  ``C`` the two are identical (each official bin then covers whole 3x3 patches: WRN
  layer3, 1024 -> 1024). For WRN layer2 (512 -> 1024) the official bins split each
  channel's patch into elements 0-4 and 4-8, so after the final 2048 -> 1024 pooling the
  official code weights the patch centre twice (1,1,1,1,2,1,1,1,1)/10 where we weight all
  nine positions 1/9.
* Order. The official code upsamples layer3's unfolded patches, then reduces channels.
  Channel pooling is per position and bilinear upsampling per channel, so they commute;
  we reduce first and upsample fewer channels. The 3x3 pooling stays at layer3's
  resolution before upsampling, as in the official code.
* Image score. The official code scores an image by the max patch distance
  (``anomaly_scorer_num_nn=1``, no reweighting). We use the paper's Eq. 7 reweighting
  with b = ``num_neighbors`` = 9 neighbours (anomalib's default; b is unspecified in
  the paper); ``num_neighbors=1`` gives the official max.
* Distances are true L2 norms, as in the paper's equations (faiss ``IndexFlatL2`` returns
  squared distances).
* Accuracy of the distances. The official code (faiss ``IndexFlatL2``) and a plain torch
  search both compute ``||q||^2 - 2 q.b + ||b||^2`` in float32. For WRN features
  ``||q||^2`` is about 700 while nearest-neighbour distances are 0.2-0.5, so the result
  loses most of its digits: on features shaped like that (bank 16k x 1536) the distances
  were off by up to 1.5e-3 against a float64 ``cdist`` (faiss: 8e-4), and k = 9
  neighbour ranks came out wrong. Here queries and bank are compared relative to the
  bank's mean (without a centred copy of the bank, see :func:`nearest_neighbors`), which
  ranks with errors around 1e-5, and the k distances found are then recomputed from the
  differences ``q - b``: 7e-8 on the same data, for both backends (docs/benchmarks.md,
  "PatchCore nearest-neighbour search").
* Which search runs. The official code uses faiss whenever it can (on the GPU when there
  is one). Here the search is chosen by measurement (``search="auto"``, see
  :func:`choose_search`): on a 2-core CPU faiss-cpu's flat search took 4.5-6x the time of
  the torch search for a batch of 8 images against a 16k x 1536 bank, and ``ad predict``
  with WRN-50 1.7x the time per batch (docs/benchmarks.md), so "faiss is installed" is
  not a reason to use it.
* The backbone keeps only the stages it runs (stem..layer3); layer4 and fc are dropped
  so their parameters are not counted. The official code keeps the whole network.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionscale.components import Component, State, run_components
from visionscale.errors import InvalidValueError
from visionscale.modelinfo import imagenet
from visionscale.nn import resnet
from visionscale.nn.filters import gaussian_blur, gaussian_kernel1d
from visionscale.registry import register_model

__all__ = [
    "DEFAULT_MAX_CHUNK_BYTES",
    "DEFAULT_PROBE_ROWS",
    "SEARCH_MODES",
    "BankStats",
    "bank_stats",
    "choose_search",
    "faiss_installed",
    "PatchCore",
    "PatchCoreConfig",
    "PatchFeatureExtractor",
    "MemoryBankSearch",
    "AnomalyMapPostprocess",
    "nearest_neighbors",
    "nn_chunk_sizes",
    "nn_step_bytes",
    "gaussian_kernel1d",
    "gaussian_blur",
    "reweighted_image_score",
    "patchcore",
    "patchcore_wrn50",
    "patchcore_tiny",
]

DEFAULT_MAX_CHUNK_BYTES = 256 * 2**20
_INDEX_BYTES = 8  # int64 neighbour indices
_MIN_QUERY_ROWS = 1024  # rows per matmul before we start chunking the bank instead

_BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "wide_resnet101_2": resnet.wide_resnet101_2,
    "wide_resnet50_2": resnet.wide_resnet50_2,
    "resnet50": resnet.resnet50,
    "resnet18": resnet.resnet18,
    "resnet_tiny": resnet.resnet_tiny,
}


# ----------------------------------------------------------------------------------------
# Exact nearest-neighbour search in bounded memory.


class BankStats(NamedTuple):
    """What the search precomputes once per memory bank (see :func:`bank_stats`).

    Attributes:
        mean: (D,) mean of the bank rows; queries and bank are compared relative to it.
        sq: (N,) ``||b - mean||^2`` of every bank row.
    """

    mean: Tensor
    sq: Tensor


def bank_stats(bank: Tensor, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> BankStats:
    """Mean and centred squared norms of an (N, D) bank, the latter from the differences themselves.

    Costs one pass over the bank; the (rows, D) differences are made in row chunks whose
    temporaries fit ``max_chunk_bytes``. Works on ``meta`` (shapes only).
    """
    if bank.dim() != 2 or bank.shape[0] < 1:
        raise ValueError(f"expected a non-empty (N, D) bank, got {tuple(bank.shape)}")
    mean = bank.mean(dim=0)  # (D,)
    sq = bank.new_empty(bank.shape[0])  # (N,)
    rows = max(1, max_chunk_bytes // ((bank.shape[1] + 2) * bank.element_size()))
    for s in range(0, bank.shape[0], rows):
        sq[s : s + rows] = torch.linalg.vector_norm(bank[s : s + rows] - mean, dim=1).square()
    return BankStats(mean, sq)


def nn_step_bytes(query_rows: int, bank_rows: int, k: int, element_size: int, dim: int = 0) -> int:
    """Bytes of temporaries held at once in one step of :func:`nearest_neighbors`.

    One step compares ``query_rows`` queries with ``bank_rows`` bank vectors: the centred
    query chunk (``query_rows x dim``; the refinement's (rows, D) gather takes its place
    once it is freed), the distance block, per-query scalars and the top-k bookkeeping
    (the block's top-k, the running top-k, their concatenation and the merged result,
    values plus int64 indices). ``dim=0`` leaves the (rows, D) temporaries out. The bank's
    :class:`BankStats` are made once per bank, not per step.
    """
    topk = 5 * k * (element_size + _INDEX_BYTES)
    return query_rows * ((bank_rows + dim + 4) * element_size + topk)


def nn_chunk_sizes(
    num_queries: int, bank_size: int, k: int = 1, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    element_size: int = 4, dim: int = 0,
) -> tuple[int, int]:
    """Query rows and bank rows per step so one step's temporaries fit ``max_chunk_bytes``.

    The whole bank goes in one step while that leaves at least ``min(num_queries, 1024)``
    query rows (no merging across bank chunks, large matmuls); beyond that the bank is cut
    into chunks too. Depends on shapes only, so it behaves the same on ``meta``.

    Returns:
        ``(query_rows, bank_rows)``, each >= 1 and at most ``num_queries`` / ``bank_size``.

    Raises:
        ValueError: If the budget cannot hold even a 1 x 1 step.
    """
    if num_queries < 1 or bank_size < 1:
        raise ValueError(f"need at least one query and one bank vector, got {num_queries} and {bank_size}")
    k = min(k, bank_size)

    def step(q: int, b: int) -> int:
        return nn_step_bytes(q, b, k, element_size, dim)

    if step(1, 1) > max_chunk_bytes:
        raise ValueError(
            f"max_chunk_bytes={max_chunk_bytes} cannot hold one step of the search "
            f"({step(1, 1)} bytes for a single query and bank vector)"
        )
    # Largest query chunk that fits next to the whole bank (the cost is linear in q).
    q_full = max_chunk_bytes // step(1, bank_size)
    if q_full >= min(num_queries, _MIN_QUERY_ROWS):
        return min(num_queries, q_full), bank_size
    # Chunk the bank too: keep the query chunk at most 1024 rows and roughly no larger than
    # the bank chunk, so tiny budgets still give balanced blocks.
    q = min(num_queries, _MIN_QUERY_ROWS)
    while True:
        b = (max_chunk_bytes - step(q, 0)) // (q * element_size) if max_chunk_bytes > step(q, 0) else 0
        if q == 1 or b >= q:
            break
        q = max(1, q // 2)
    return q, max(1, min(bank_size, b))


def nearest_neighbors(
    queries: Tensor,
    bank: Tensor,
    k: int = 1,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    use_faiss: bool = False,
    *,
    stats: BankStats | None = None,
    refine: bool = True,
) -> tuple[Tensor, Tensor]:
    """Exact k nearest neighbours in L2 without building the (queries x bank) matrix.

    Loops over query chunks and bank chunks sized by :func:`nn_chunk_sizes`. Each step
    computes squared distances with one matmul, relative to the bank's mean ``m`` (see
    :class:`BankStats`): with ``q' = q - m`` and ``b' = b - m``,
    ``||q' - b'||^2 = (||q'||^2 + 2 q'.m) - 2 q'.b + ||b'||^2``, so the bank is used as
    stored (no centred copy of it) while the large common offset of patch features no
    longer cancels the digits of the result. It clamps at 0, and merges the step's top-k
    into a running top-k. With ``refine`` the k distances found are then recomputed as
    ``||q - b||`` from the differences (a (rows, D) gather per neighbour), which makes them
    exact to float rounding; the matmul form only has to rank the candidates.

    Loops depend on shapes only, so the search runs on ``meta``, where only the first
    query chunk is computed and the others just allocate their results (same live tensors,
    far fewer steps). ``queries`` may be a strided view, e.g. ``emb[i].flatten(1).T`` of a
    (B, D, h, w) map: each chunk is centred into a contiguous copy.

    Args:
        queries: (Q, D).
        bank: (N, D), same dtype and device.
        k: Neighbours per query; clipped to N.
        max_chunk_bytes: Budget for one step's temporaries (see :func:`nn_step_bytes`);
            the (Q, k) results and the bank's (N,) + (D,) stats come on top of it.
        use_faiss: Rank with faiss ``IndexFlatL2`` (built per call from the centred bank)
            when importable and both tensors are on CPU (never on ``meta``).
        stats: The bank's :func:`bank_stats`, if already computed (they are otherwise
            computed here, one pass over the bank).
        refine: Recompute the k distances from the differences (see above).

    Returns:
        ``(dist, idx)``: L2 distances (Q, k) ascending, and int64 bank indices (Q, k).
    """
    if queries.dim() != 2 or bank.dim() != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(f"expected queries (Q, D) and bank (N, D), got {tuple(queries.shape)} and {tuple(bank.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if stats is None:
        stats = bank_stats(bank, max_chunk_bytes)
    if use_faiss and queries.device.type == "cpu" and bank.device.type == "cpu" and faiss_installed():
        index = _faiss_index(bank, stats.mean, max_chunk_bytes)
        return _faiss_knn(index, queries, bank, stats.mean, min(k, bank.shape[0]), max_chunk_bytes, refine)
    return _torch_knn(queries, bank, stats, k, max_chunk_bytes, refine)


def _torch_knn(queries: Tensor, bank: Tensor, stats: BankStats, k: int, max_chunk_bytes: int,
               refine: bool) -> tuple[Tensor, Tensor]:
    num_q, (num_b, dim) = queries.shape[0], bank.shape
    k = min(k, num_b)
    q_rows, b_rows = nn_chunk_sizes(num_q, num_b, k, max_chunk_bytes, queries.element_size(), dim)
    on_meta = queries.device.type == "meta"
    dists: list[Tensor] = []
    idxs: list[Tensor] = []
    for qs in range(0, num_q, q_rows):
        if on_meta and qs > 0:
            # Shapes only: every query chunk allocates exactly what the first one did, so
            # after one full pass just allocate the chunk's results. Keeps a 3000 px
            # profile (~6000 steps) as cheap as one chunk, with the same live tensors.
            rows = min(q_rows, num_q - qs)
            dists.append(queries.new_empty((rows, k)))
            idxs.append(torch.empty((rows, k), dtype=torch.int64, device=queries.device))
            continue
        d, i = _knn_rows(queries[qs : qs + q_rows], bank, stats, k, b_rows, refine)  # its temporaries die here
        dists.append(d)
        idxs.append(i)
    if len(dists) == 1:
        return dists[0], idxs[0]
    return torch.cat(dists), torch.cat(idxs)


def _knn_rows(q: Tensor, bank: Tensor, stats: BankStats, k: int, b_rows: int, refine: bool) -> tuple[Tensor, Tensor]:
    """k nearest bank rows of one query chunk (q, D), bank chunks of ``b_rows`` at a time."""
    num_b = bank.shape[0]
    # (q, D) centred into a row-major buffer: ``q - mean`` alone would keep the layout of a
    # transposed view, and the matmul on that layout was measured 2x less accurate.
    qc = q.new_empty(q.shape).copy_(q).sub_(stats.mean)
    # (q, 1) ||q'||^2 + 2 q'.m: with the bank's ||b'||^2 and -2 q'.b this is ||q' - b'||^2.
    q_const = torch.linalg.vector_norm(qc, dim=1).square_().add_(qc @ stats.mean, alpha=2).unsqueeze(1)
    best_d = best_i = None
    for bs in range(0, num_b, b_rows):
        b = bank[bs : bs + b_rows]  # (b, D) view
        block = torch.addmm(stats.sq[bs : bs + b_rows].unsqueeze(0), qc, b.T, alpha=-2)  # (q, b)
        block.add_(q_const).clamp_min_(0)  # squared distances, in place: no second block
        if k == 1:
            d, i = block.min(dim=1, keepdim=True)  # (q, 1), first index on ties
        else:
            d, i = block.topk(min(k, block.shape[1]), dim=1, largest=False)  # (q, <=k)
        del block
        i = i + bs
        if best_d is None:
            best_d, best_i = d, i
        elif k == 1:
            better = d < best_d  # strict: the earlier chunk wins ties, like argmin
            best_d = torch.where(better, d, best_d)
            best_i = torch.where(better, i, best_i)
        else:
            best_d, pos = torch.cat([best_d, d], dim=1).topk(k, dim=1, largest=False)  # (q, k)
            best_i = torch.cat([best_i, i], dim=1).gather(1, pos)
    del qc
    if refine:
        return _exact_distances(q, bank, best_i)
    return best_d.sqrt_(), best_i


def _exact_distances(q: Tensor, bank: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """``||q - bank[idx]||`` (q, k) from the differences, re-sorted ascending with ``idx``.

    One (q, D) gather per neighbour column. The difference of two nearby vectors is exact
    to rounding of its own (small) entries, so the distance keeps float precision however
    large the vectors' common offset is.
    """
    dist = q.new_empty(idx.shape)  # (q, k)
    for j in range(idx.shape[1]):
        diff = bank.index_select(0, idx[:, j]).sub_(q)  # (q, D)
        dist[:, j] = torch.linalg.vector_norm(diff, dim=1)
        del diff
    if idx.shape[1] > 1:
        dist, order = dist.sort(dim=1, stable=True)
        idx = idx.gather(1, order)
    return dist, idx


def faiss_installed() -> bool:
    """True when the optional ``faiss`` package can be imported (checked without importing it)."""
    if "faiss" in sys.modules:
        return sys.modules["faiss"] is not None  # None: imports of it are blocked
    try:
        return importlib.util.find_spec("faiss") is not None
    except (ImportError, ValueError):
        return False


def _faiss_index(bank: Tensor, mean: Tensor, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES):
    """faiss ``IndexFlatL2`` over the centred bank, added in row chunks (no centred (N, D) copy)."""
    import faiss  # optional dependency, imported only when asked for

    index = faiss.IndexFlatL2(bank.shape[1])
    rows = max(1, max_chunk_bytes // (bank.shape[1] * 4))
    for s in range(0, bank.shape[0], rows):
        index.add((bank[s : s + rows].detach() - mean).to(torch.float32).contiguous().numpy())
    return index


def _faiss_knn(index, queries: Tensor, bank: Tensor, mean: Tensor, k: int, max_chunk_bytes: int,
               refine: bool) -> tuple[Tensor, Tensor]:
    """Rank with a :func:`_faiss_index`; distances refined like the torch search's, in row chunks."""
    rows = max(1, max_chunk_bytes // (queries.shape[1] * 4))
    dists, idxs = [], []
    for s in range(0, queries.shape[0], rows):
        q = queries[s : s + rows].detach()
        sq, idx = index.search((q - mean).to(torch.float32).contiguous().numpy(), k)
        idx = torch.from_numpy(idx).to(torch.int64)
        if refine:
            d, idx = _exact_distances(q, bank, idx)
        else:
            d = torch.from_numpy(sq).clamp_min_(0).sqrt_().to(queries.dtype)  # faiss gives squared L2
        dists.append(d)
        idxs.append(idx)
    if len(dists) == 1:
        return dists[0], idxs[0]
    return torch.cat(dists), torch.cat(idxs)


# ----------------------------------------------------------------------------------------
# Choosing the search backend by measurement.

SEARCH_MODES = ("auto", "torch", "faiss")
DEFAULT_PROBE_ROWS = 256
_WARMUP_ROWS = 8
# Multiply-adds one probe run may cost (rows x N x D): 256 rows against a 16k x 1024 bank.
# Measured on 2 loaded CPU cores: ~0.3 s for torch and ~1 s for faiss-cpu at this size, so
# large banks (high resolution) are probed with fewer rows, never fewer than 32.
_PROBE_WORK = 2**32
_MIN_PROBE_ROWS = 32


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def choose_search(
    bank: Tensor,
    sample_queries: Tensor,
    k: int = 1,
    *,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    stats: BankStats | None = None,
    repeats: int = 2,
    backends: Mapping[str, Callable[[Tensor], object]] | None = None,
    timer: Callable[[], float] = time.perf_counter,
) -> dict:
    """Pick the faster exact search for this bank on this machine, by timing both.

    Rules: a bank that is not on the CPU (CUDA, ``meta``...) is searched with torch, since
    faiss-cpu only reads CPU memory; on the CPU without faiss installed, torch. Otherwise
    every backend runs once untimed on a few rows (imports, thread pools, the faiss
    index), then ``repeats`` times on ``sample_queries`` (a few hundred rows are enough:
    both search by matrix products over the whole bank), and the smallest time counts. A
    backend whose first timed run takes more than twice the best so far is not repeated.
    Ties go to torch (listed first).

    Args:
        bank: (N, D) memory bank, on the device it will be searched on.
        sample_queries: (S, D) queries like those to come (same D, dtype and device).
        k: Neighbours per query.
        max_chunk_bytes: Budget of the torch search's steps.
        stats: The bank's :func:`bank_stats`, if already computed.
        repeats: Timed runs per backend (>= 1).
        backends: Name -> callable searching given queries; default torch and, when
            installed, faiss. For tests: fake backends, with a fake ``timer``.
        timer: Seconds, monotonic.

    Returns:
        ``{"backend": name, "reason": text, "probe_ms": {name: ms}, "probe_rows": S}``;
        ``probe_ms`` is empty when nothing was timed.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    rows = int(sample_queries.shape[0])
    if backends is None:
        if bank.device.type != "cpu":
            return _choice("torch", f"faiss-cpu cannot search {bank.device.type} tensors")
        if not faiss_installed():
            return _choice("torch", "faiss is not installed")
        backends = _default_backends(bank, k, max_chunk_bytes, stats)
    if len(backends) == 1 or rows == 0:
        name = next(iter(backends))
        return _choice(name, "the only backend" if len(backends) == 1 else "no sample queries to time")
    for fn in backends.values():
        fn(sample_queries[:_WARMUP_ROWS])  # untimed: imports, thread pools, indexes
    probe: dict[str, float] = {}
    for name, fn in backends.items():
        best = float("inf")
        for r in range(repeats):
            t0 = timer()
            fn(sample_queries)
            best = min(best, timer() - t0)
            if r == 0 and probe and best > 2 * min(probe.values()):
                break  # clearly slower: a second run would not change the choice
        probe[name] = best
    fastest = min(probe, key=probe.get)  # first on ties
    return _choice(fastest, f"fastest in a probe of {rows} query rows against {bank.shape[0]} bank rows",
                   {n: round(s * 1000, 3) for n, s in probe.items()}, rows)


def _choice(backend: str, reason: str, probe_ms: dict | None = None, rows: int = 0) -> dict:
    return {"backend": backend, "reason": reason, "probe_ms": probe_ms or {}, "probe_rows": rows}


def _default_backends(bank: Tensor, k: int, max_chunk_bytes: int,
                      stats: BankStats | None) -> dict[str, Callable[[Tensor], object]]:
    """torch and faiss searches of the bank as :class:`MemoryBankSearch` runs them (faiss index built once)."""
    stats = stats if stats is not None else bank_stats(bank, max_chunk_bytes)
    index: list = []

    def faiss_search(q: Tensor):
        if not index:
            index.append(_faiss_index(bank, stats.mean, max_chunk_bytes))  # in the untimed warm-up
        return _faiss_knn(index[0], q, bank, stats.mean, min(k, bank.shape[0]), max_chunk_bytes, True)

    return {
        "torch": lambda q: _torch_knn(q, bank, stats, k, max_chunk_bytes, True),
        "faiss": faiss_search,
    }


def _search_mode(search: str | bool, use_faiss: bool | None, owner: str) -> str:
    """Validate ``search`` and fold the deprecated ``use_faiss`` flag into it."""
    if isinstance(search, bool):  # the old positional use_faiss argument
        use_faiss, search = search, "auto"
    if use_faiss is not None:
        warnings.warn(f"{owner}: use_faiss is deprecated, use search='auto' (measured), 'torch' or 'faiss'",
                      DeprecationWarning, stacklevel=3)
        forced = "faiss" if use_faiss else "torch"
        if search not in ("auto", forced):
            raise InvalidValueError(f"use_faiss={use_faiss} contradicts search={search!r}").about("search",
                                                                                               "use_faiss")
        search = forced
    if search not in SEARCH_MODES:
        raise InvalidValueError(f"search must be one of {', '.join(SEARCH_MODES)}, got {search!r}").about("search")
    return search


def reweighted_image_score(
    embedding: Tensor,
    patch_dist: Tensor,
    patch_idx: Tensor,
    bank: Tensor,
    num_neighbors: int = 9,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    *,
    stats: BankStats | None = None,
) -> Tensor:
    """Image score of the paper's Eq. 7.

    ``s = (1 - exp||m_test* - m*|| / sum_{m in N_b(m*)} exp||m_test* - m||) * s*``, where
    ``m_test*`` is the patch with the largest nearest-neighbour distance ``s*``, ``m*`` its
    nearest bank vector and ``N_b(m*)`` the ``b`` bank vectors nearest to ``m*`` (``m*``
    itself among them). A test patch whose match sits in a dense part of the bank gets a
    smaller weight. ``num_neighbors <= 1`` returns ``s*`` (the official code's score).

    Args:
        embedding: Patch features (B, D, h, w).
        patch_dist: Nearest-neighbour distance per patch (B, h*w).
        patch_idx: Bank index of that neighbour (B, h*w), int64.
        bank: Memory bank (N, D).
        num_neighbors: b.
        max_chunk_bytes: Budget of the search for ``N_b(m*)``.
        stats: The bank's :func:`bank_stats`, if already computed.

    Returns:
        (B,) scores.
    """
    s_star, pos = patch_dist.max(dim=1)  # (B,), (B,)
    if num_neighbors <= 1:
        return s_star
    batch, dim = embedding.shape[:2]
    m_star = bank[patch_idx.gather(1, pos.unsqueeze(1)).squeeze(1)]  # (B, D)
    flat = embedding.flatten(2)  # (B, D, h*w) view
    m_test = flat.gather(2, pos.view(batch, 1, 1).expand(batch, dim, 1)).squeeze(2)  # (B, D)
    _, support = nearest_neighbors(m_star, bank, k=num_neighbors, max_chunk_bytes=max_chunk_bytes,
                                   stats=stats, refine=False)  # (B, b): only the indices are used
    d_support = torch.linalg.vector_norm(m_test.unsqueeze(1) - bank[support], dim=2)  # (B, b)
    d_star = torch.linalg.vector_norm(m_test - m_star, dim=1)  # (B,) == s* up to rounding
    # exp(d*) / sum exp(d) computed as exp(d* - logsumexp(d)): no overflow for large d.
    weight = 1 - torch.exp(d_star - torch.logsumexp(d_support, dim=1))
    return weight * s_star


# ----------------------------------------------------------------------------------------
# Gaussian smoothing of the anomaly map.


# gaussian_kernel1d / gaussian_blur live in visionscale.nn.filters (shared with DDAD).


# ----------------------------------------------------------------------------------------
# Model.


@dataclass(frozen=True)
class PatchCoreConfig:
    """PatchCore architecture and the (simulated) memory bank.

    Attributes:
        backbone: Key of ``visionscale.nn.resnet`` factories (``wide_resnet101_2``...).
        backbone_weights: None = random init; ``"DEFAULT"``, a weights name or a file path.
        layers: Backbone stages whose maps are aggregated; the first sets the patch grid.
        image_size: (H, W) the bank size is computed for (train and test resolution).
        patch_size: Neighbourhood p of the local average (official ``patchsize=3``).
        pretrain_embed_dim: Channels each layer is pooled to; None keeps them.
        embed_dim: Channels of the concatenation after pooling (official
            ``target_embed_dimension``, 1024); None skips both poolings (512+1024 = 1536
            for WRN), which is anomalib's embedding.
        num_train_images: Training images the bank is built from.
        coreset_ratio: Fraction of training patches kept (0.1 = PatchCore-10).
        num_neighbors: b of Eq. 7; 1 = plain max (the official code).
        sigma: Gaussian smoothing of the anomaly map (paper: 4).
        max_chunk_bytes: Temporaries budget of the nearest-neighbour search.
        search: ``"auto"`` (the faster of torch and faiss by a probe, see
            :class:`MemoryBankSearch`), ``"torch"`` or ``"faiss"``.
        use_faiss: Deprecated alias: True means ``search="faiss"``, False ``"torch"``;
            folded into ``search`` (and reset to None) on construction.
    """

    backbone: str = "wide_resnet101_2"
    backbone_weights: str | None = None
    layers: tuple[str, ...] = ("layer2", "layer3")
    image_size: tuple[int, int] = (256, 256)
    patch_size: int = 3
    pretrain_embed_dim: int | None = 1024
    embed_dim: int | None = 1024
    num_train_images: int = 200
    coreset_ratio: float = 0.1
    num_neighbors: int = 9
    sigma: float = 4.0
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
    search: str = "auto"
    use_faiss: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "search", _search_mode(self.search, self.use_faiss, "PatchCoreConfig"))
        object.__setattr__(self, "use_faiss", None)
        if self.backbone not in _BACKBONES:
            raise ValueError(f"backbone must be one of {sorted(_BACKBONES)}, got {self.backbone!r}")
        if not self.layers or any(n not in resnet.STAGES for n in self.layers):
            raise ValueError(f"layers must be a non-empty subset of {resnet.STAGES}, got {self.layers!r}")
        if self.patch_size < 1 or self.patch_size % 2 == 0:
            raise ValueError(f"patch_size must be odd and positive (the map keeps its size), got {self.patch_size}")
        if not 0 < self.coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        for name in ("num_train_images", "num_neighbors", "max_chunk_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("pretrain_embed_dim", "embed_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be None or >= 1, got {value}")
        if self.sigma <= 0:
            raise ValueError(f"sigma must be positive, got {self.sigma}")


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def _stage_size(n: int, stride: int) -> int:
    # Every stride-2 step of a ResNet (7x7/2 conv, 3x3/2 max pool, strided 3x3 and 1x1
    # convs, all padded) maps n -> ceil(n / 2), so a stride-s stage has ceil(n / s) pixels.
    return -(-n // stride)


def _channel_pool(x: Tensor, channels: int) -> Tensor:
    """Adaptive average pooling over the channel axis of (B, C, h, w) -> (B, channels, h, w).

    Same bins as the official ``F.adaptive_avg_pool1d`` on each position's vector, done as a
    3-D pool over (C, h, w) with h and w unchanged, so no (B*h*w, C) permuted copy is made.
    """
    if x.shape[1] == channels:
        return x  # identity bins
    return F.adaptive_avg_pool3d(x.unsqueeze(1), (channels, x.shape[2], x.shape[3])).squeeze(1)


class PatchFeatureExtractor(nn.Module):
    """Backbone + locally aware patch features: (B, 3, H, W) -> (B, D, ceil(H/8), ceil(W/8))."""

    def __init__(self, backbone: nn.Module, layers: tuple[str, ...], patch_size: int,
                 pretrain_embed_dim: int | None, embed_dim: int | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.layers = tuple(layers)
        self.patch_size = patch_size
        self.pretrain_embed_dim = pretrain_embed_dim if embed_dim is not None else None
        self.embed_dim = embed_dim
        # (B, out_channels, h, w): the concatenated layers, or embed_dim after pooling.
        self.out_channels = embed_dim if embed_dim is not None else sum(backbone.channels[n] for n in self.layers)

    def forward(self, x: Tensor) -> Tensor:
        feats = self.backbone.features(x, self.layers)
        ref = feats[self.layers[0]].shape[-2:]  # patch grid = first layer's map (stride 8)
        pad = self.patch_size // 2
        maps = []
        for name in self.layers:
            f = feats[name]  # (B, C_l, h_l, w_l)
            # Eq. 2: average over the p x p neighbourhood, at the layer's own resolution.
            f = F.avg_pool2d(f, self.patch_size, stride=1, padding=pad, count_include_pad=True)
            if self.pretrain_embed_dim is not None:
                f = _channel_pool(f, self.pretrain_embed_dim)  # (B, P, h_l, w_l)
            if f.shape[-2:] != ref:
                f = F.interpolate(f, size=ref, mode="bilinear", align_corners=False)  # (B, P, h, w)
            maps.append(f)
        emb = torch.cat(maps, dim=1) if len(maps) > 1 else maps[0]  # (B, sum P, h, w)
        if self.embed_dim is not None:
            emb = _channel_pool(emb, self.embed_dim)  # (B, D, h, w)
        return emb


class MemoryBankSearch(nn.Module):
    """Holds the memory bank; patch scores by exact nearest-neighbour search, image score by Eq. 7.

    ``search`` says how the bank is searched: ``"torch"`` (the chunked search of
    :func:`nearest_neighbors`, any device), ``"faiss"`` (faiss-cpu ``IndexFlatL2``, built
    once per forward, a copy of the bank while it runs; CPU only, torch elsewhere) or
    ``"auto"``: the first forward for a
    bank tensor runs :func:`choose_search` on its batch's first ``probe_rows`` patches and
    keeps the faster backend until the bank is replaced or moved; :meth:`choose` makes the
    decision eagerly. The probe costs about as much as searching ``probe_rows`` (256)
    patches with each backend; banks larger than 16k x 1024 are probed with fewer rows
    (:meth:`probe_rows_for`, at least 32), so its cost stays bounded at high resolution. :attr:`search_choice` holds the decision (``None`` until made):
    ``{"search", "backend", "reason", "probe_ms", "probe_rows"}``, e.g. for a log line.
    Both backends rank exactly and refine the distances the same way, so they give the
    same scores up to ties between equidistant bank rows. Graph capture (``torch.export``,
    ``torch.compile``, tracing) always records the torch search.

    The bank's :func:`bank_stats` are computed on first use and cached while the bank
    tensor is neither replaced nor changed in place. They are not buffers: the state dict
    holds ``memory_bank`` only, as in runs saved before they existed.

    Per-position banks (tiled runs fitted with ``tile_bank="per-position"``): ``memory_bank``
    holds P banks one after another and the buffer ``bank_offsets`` (P + 1,) their row
    offsets (it is None, and not in the state dict, with one bank). Each forward then needs
    ``positions``, the tile position of every input, and searches input ``i`` in bank
    ``positions[i]`` only (:meth:`search_positions`); the backend decision is made once, on
    the whole bank.
    """

    memory_bank: Tensor

    def __init__(self, bank_size: int, dim: int, num_neighbors: int = 9,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, search: str = "auto", *,
                 use_faiss: bool | None = None, probe_rows: int = DEFAULT_PROBE_ROWS) -> None:
        super().__init__()
        # Random stand-in for a coreset of nominal patch features (N, D): same size and
        # cost as the real bank; built on whatever device is the default (meta is free).
        self.register_buffer("memory_bank", torch.randn(bank_size, dim))
        self.num_neighbors = num_neighbors
        self.max_chunk_bytes = max_chunk_bytes
        self.search = _search_mode(search, use_faiss, "MemoryBankSearch")
        if self.search == "faiss" and not faiss_installed():
            raise InvalidValueError("search='faiss' needs the faiss package (faiss-cpu), which is not installed; "
                                    "use search='auto' or 'torch'").about("search")
        self.probe_rows = probe_rows
        self.search_choice: dict | None = None
        self._choice_for: weakref.ref | None = None  # the bank tensor search_choice was made for
        self._stats: tuple | None = None  # (weakref to the bank, its version, BankStats)
        # Per-position banks (a tiled fit with tile_bank "per-position"): bank p is
        # memory_bank[bank_offsets[p]:bank_offsets[p + 1]]. None: one bank for every input; a
        # None buffer is not in the state dict, so runs with one bank save what they always did.
        self.register_buffer("bank_offsets", None)
        self.positions: list[int] | None = None  # position of each input of the next forward
        self._position_stats: tuple | None = None  # (weakref to the bank, its version, {p: BankStats})

    @property
    def use_faiss(self) -> bool:
        """Deprecated: True when forward searches with faiss. Setting it forces ``search``."""
        if self.search != "auto":
            return self.search == "faiss"
        return self.search_choice is not None and self.search_choice["backend"] == "faiss"

    @use_faiss.setter
    def use_faiss(self, value: bool) -> None:
        self.search = "faiss" if value else "torch"
        self.search_choice = self._choice_for = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_choice_for"] = state["_stats"] = None  # weak references do not pickle; recomputed
        return state

    def bank_stats(self) -> BankStats:
        """:func:`bank_stats` of the current bank, cached."""
        bank = self.memory_bank
        if _tracing():
            return bank_stats(bank, self.max_chunk_bytes)  # in the graph, not a constant
        try:
            version = bank._version
        except RuntimeError:  # an inference-mode tensor has no version counter
            version = -1
        cached = self._stats
        if cached is None or cached[0]() is not bank or cached[1] != version:
            cached = self._stats = (weakref.ref(bank), version, bank_stats(bank, self.max_chunk_bytes))
        return cached[2]

    @property
    def num_positions(self) -> int:
        """Banks held: 1, or the number of tile positions of a per-position run."""
        return 1 if self.bank_offsets is None else int(self.bank_offsets.shape[0]) - 1

    def position_bank(self, position: int) -> Tensor:
        """(N_p, D) view of position ``position``'s bank (the whole bank without per-position banks)."""
        if self.bank_offsets is None:
            return self.memory_bank
        lo, hi = self._bounds(position)
        return self.memory_bank[lo:hi]

    def _bounds(self, position: int) -> tuple[int, int]:
        offsets = self.bank_offsets
        if not 0 <= position < offsets.shape[0] - 1:
            raise InvalidValueError(f"tile position {position} is out of range: this model has "
                                    f"{offsets.shape[0] - 1} per-position banks").about("positions")
        if offsets.device.type == "meta":  # shapes only: every bank as large as the whole one
            return 0, self.memory_bank.shape[0]
        return int(offsets[position]), int(offsets[position + 1])

    def position_bank_stats(self, position: int) -> BankStats:
        """:func:`bank_stats` of one position's bank, cached like :meth:`bank_stats`."""
        bank = self.memory_bank
        try:
            version = bank._version
        except RuntimeError:
            version = -1
        cached = self._position_stats
        if cached is None or cached[0]() is not bank or cached[1] != version:
            cached = self._position_stats = (weakref.ref(bank), version, {})
        stats = cached[2]
        if position not in stats:
            stats[position] = bank_stats(self.position_bank(position), self.max_chunk_bytes)
        return stats[position]

    def choose(self, sample_queries: Tensor | None = None) -> dict:
        """Decide now how the current bank is searched; sets and returns :attr:`search_choice`.

        Args:
            sample_queries: (S, D) patches like those to come; the first ``probe_rows`` are
                timed. None: bank rows stand in for them (the search's cost does not
                depend on the values).
        """
        bank = self.memory_bank
        device = bank.device.type
        if self.search == "torch":
            choice = _choice("torch", "search='torch'")
        elif self.search == "faiss":
            if device != "cpu":
                choice = _choice("torch", f"search='faiss', but faiss-cpu cannot search {device} tensors")
            elif not faiss_installed():
                choice = _choice("torch", "search='faiss', but faiss is not installed")
            else:
                choice = _choice("faiss", "search='faiss'")
        else:
            rows = self.probe_rows_for(bank.shape[0], bank.shape[1])
            if sample_queries is None:
                sample_queries = bank[:: max(1, bank.shape[0] // rows)]
            choice = choose_search(bank, sample_queries[:rows], 1, max_chunk_bytes=self.max_chunk_bytes,
                                   stats=self.bank_stats() if device == "cpu" else None)
        self.search_choice = {"search": self.search, **choice}
        self._choice_for = weakref.ref(bank)
        return self.search_choice

    def probe_rows_for(self, bank_rows: int, dim: int) -> int:
        """Query rows the auto probe times: ``probe_rows``, fewer for large banks (bounded work)."""
        return min(self.probe_rows, max(_MIN_PROBE_ROWS, _PROBE_WORK // max(1, bank_rows * dim)))

    def _backend(self, embedding: Tensor) -> str:
        if _tracing():
            return "torch"
        if self.search_choice is None or self._choice_for is None or self._choice_for() is not self.memory_bank:
            self.choose(embedding[0].flatten(1).T)  # (h*w, D) view: the first image's patches
        return self.search_choice["backend"]

    def forward(self, embedding: Tensor) -> tuple[Tensor, Tensor]:
        """(B, D, h, w) -> patch scores (B, 1, h, w) and image scores (B,)."""
        if self.bank_offsets is not None:
            dist, _, score = self.search_positions(embedding)
            return dist.view(embedding.shape[0], 1, *embedding.shape[2:]), score
        batch, dim, h, w = embedding.shape
        bank = self.memory_bank
        stats = self.bank_stats()
        index = _faiss_index(bank, stats.mean, self.max_chunk_bytes) if self._backend(embedding) == "faiss" else None
        dists, idxs = [], []
        for i in range(batch):
            queries = embedding[i].flatten(1).T  # (h*w, D) strided view, no copy
            if index is None:
                d, j = _torch_knn(queries, bank, stats, 1, self.max_chunk_bytes, True)
            else:
                d, j = _faiss_knn(index, queries, bank, stats.mean, 1, self.max_chunk_bytes, True)
            dists.append(d.T)  # (1, h*w)
            idxs.append(j.T)
        del index
        patch_dist = torch.cat(dists) if batch > 1 else dists[0]  # (B, h*w)
        patch_idx = torch.cat(idxs) if batch > 1 else idxs[0]
        score = reweighted_image_score(embedding, patch_dist, patch_idx, bank, self.num_neighbors,
                                       self.max_chunk_bytes, stats=stats)
        return patch_dist.view(batch, 1, h, w), score


    def search_positions(self, embedding: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-position banks: input ``i`` (B, D, h, w) is searched only in the bank of tile
        position ``positions[i]``, and its Eq. 7 score reweights with that bank alone (each
        position is a PatchCore of its own).

        Returns:
            ``(dist, idx, score)``: nearest distances (B, h*w), their rows in the concatenated
            ``memory_bank`` (B, h*w; row ``idx`` lies in ``[offsets[p], offsets[p + 1])``),
            image scores (B,).
        """
        batch = embedding.shape[0]
        positions = self.positions
        if positions is None and self.memory_bank.device.type == "meta":
            positions = [0] * batch  # shapes only (memory planning): each bank as large as the whole
        if positions is None or len(positions) != batch:
            raise InvalidValueError(
                f"this PatchCore has {self.num_positions} per-position memory banks: say which tile position "
                f"each of the {batch} inputs is (nn_search.positions, set by score_images), got "
                f"{positions!r}").about("positions")
        faiss = self._backend(embedding) == "faiss"
        dists, idxs, scores = [], [], []
        for i, p in enumerate(positions):
            lo, _ = self._bounds(int(p))
            bank, stats = self.position_bank(int(p)), self.position_bank_stats(int(p))
            queries = embedding[i].flatten(1).T  # (h*w, D) strided view, no copy
            if faiss:
                index = _faiss_index(bank, stats.mean, self.max_chunk_bytes)
                d, j = _faiss_knn(index, queries, bank, stats.mean, 1, self.max_chunk_bytes, True)
                del index
            else:
                d, j = _torch_knn(queries, bank, stats, 1, self.max_chunk_bytes, True)
            scores.append(reweighted_image_score(embedding[i : i + 1], d.T, j.T, bank, self.num_neighbors,
                                                 self.max_chunk_bytes, stats=stats))
            dists.append(d.T)  # (1, h*w)
            idxs.append(j.T + lo)
        return torch.cat(dists), torch.cat(idxs), torch.cat(scores)


class AnomalyMapPostprocess(nn.Module):
    """Patch scores (B, 1, h, w) -> anomaly map (B, 1, H, W): bilinear upsampling + Gaussian blur."""

    kernel: Tensor

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        self.register_buffer("kernel", gaussian_kernel1d(sigma))  # (2 * int(4 sigma + 0.5) + 1,)

    @property
    def radius(self) -> int:
        return self.kernel.shape[0] // 2

    def forward(self, patch_scores: Tensor, size: tuple[int, int]) -> Tensor:
        x = F.interpolate(patch_scores, size=tuple(size), mode="bilinear", align_corners=False)  # (B, 1, H, W)
        return gaussian_blur(x, self.kernel)


class PatchCore(nn.Module):
    """PatchCore at inference: ``forward(x)`` -> ``{"anomaly_map": (B,1,H,W), "pred_score": (B,)}``.

    Components, in order: ``feature_extractor`` (backbone + patch aggregation),
    ``nn_search`` (memory bank + nearest neighbours + Eq. 7) and ``postprocess``
    (upsampling + Gaussian blur).
    """

    def __init__(self, config: PatchCoreConfig | None = None) -> None:
        super().__init__()
        cfg = config or PatchCoreConfig()
        self.config = cfg
        backbone = _BACKBONES[cfg.backbone](weights=cfg.backbone_weights, num_classes=0)
        # Keep only the stages that run: features() stops at the deepest requested layer.
        last = max(resnet.STAGES.index(n) for n in cfg.layers)
        for name in resnet.STAGES[last + 1 :]:
            delattr(backbone, name)
        self.feature_extractor = PatchFeatureExtractor(
            backbone, cfg.layers, cfg.patch_size, cfg.pretrain_embed_dim, cfg.embed_dim
        )
        self.feature_stride = backbone.strides[cfg.layers[0]]
        self.embed_dim = self.feature_extractor.out_channels
        self.bank_size = self.bank_size_for(cfg.image_size)
        self.nn_search = MemoryBankSearch(
            self.bank_size, self.embed_dim, cfg.num_neighbors, cfg.max_chunk_bytes, cfg.search
        )
        self.postprocess = AnomalyMapPostprocess(cfg.sigma)
        # With per-position banks (set_memory_bank(bank, offsets)): the visionscale.tiling.TileGrid
        # of the image size they were fitted on, whose row-major tiles are the positions. Set by
        # the fit and by loading a run; score_images refuses images of another grid.
        self.tile_grid = None
        # The memory-bank search loops over the batch in Python, so a graph fixes the batch
        # anyway; exported with batch 2 and dynamic H/W it failed in ONNX Runtime (a Resize
        # got wrong scales), with batch 1 it runs and H/W stay dynamic.
        # Tiles start on the patch grid (stride 8); within 32 px of an inner tile edge the
        # blur's reflected border and the backbone's zero padding change the scores (the
        # backbone's receptive field is wider, so beyond it they differ a little, not zero).
        self.model_info = imagenet(input_size=tuple(cfg.image_size), export_batch=1, tile_align=self.feature_stride,
                                   tile_margin=max(32, 2 * self.postprocess.radius))

    # A tiled image's score is its most anomalous tile's score (Eq. 7 reweights one patch).
    tile_score = "tile_max"

    def feature_size(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """Patch grid (h, w) for an input size: ceil(H / 8) x ceil(W / 8) for layer2."""
        h, w = _pair(image_size)
        return _stage_size(h, self.feature_stride), _stage_size(w, self.feature_stride)

    def bank_size_for(self, image_size: int | tuple[int, int]) -> int:
        """N = round(coreset_ratio * num_train_images * h * w), at least 1."""
        h, w = self.feature_size(image_size)
        cfg = self.config
        return max(1, round(cfg.coreset_ratio * cfg.num_train_images * h * w))

    @property
    def min_input_size(self) -> int:
        # 32 px leaves a 2x2 layer3 map (stride 16) for the 3x3 neighbourhood; the blur's
        # reflected border needs the map to be at least its radius (16 px for sigma 4).
        return max(32, self.postprocess.radius)

    def validate_input_size(self, h: int, w: int) -> None:
        """Any H, W >= 32 works (no divisibility needed: the grid is ceil(H/8) x ceil(W/8))."""
        m = self.min_input_size
        if h < m or w < m:
            raise ValueError(
                f"PatchCore needs height and width >= {m} (a 2x2 layer3 map for the 3x3 patch "
                f"neighbourhood, and a map no smaller than the Gaussian blur's radius), got {h}x{w}"
            )

    def set_memory_bank(self, bank: Tensor, offsets: Tensor | None = None) -> None:
        """Replace the memory bank with (N, D) patch features (any N, D = ``embed_dim``).

        Args:
            bank: (N, D); with ``offsets``, the per-position banks one after another.
            offsets: (P + 1,) int64 row offsets of P per-position banks (``0 = o_0 < o_1 <
                ... < o_P = N``; bank p is rows ``o_p`` to ``o_{p+1}``), searched by tile
                position (:meth:`MemoryBankSearch.search_positions`); None: one bank for
                every input.
        """
        if bank.dim() != 2 or bank.shape[1] != self.embed_dim:
            raise ValueError(f"memory bank must be (N, {self.embed_dim}), got {tuple(bank.shape)}")
        if bank.shape[0] < 1:
            raise ValueError("memory bank must not be empty")
        old = self.nn_search.memory_bank
        if offsets is not None:
            offsets = torch.as_tensor(offsets).detach().to(device="cpu", dtype=torch.int64)
            steps = offsets[1:] - offsets[:-1]
            if (offsets.dim() != 1 or offsets.shape[0] < 2 or int(offsets[0]) != 0
                    or int(offsets[-1]) != bank.shape[0] or bool((steps < 1).any())):
                raise ValueError(f"bank offsets must rise strictly from 0 to the bank's {bank.shape[0]} rows "
                                 f"(every position's bank non-empty), got {offsets.tolist()}")
            offsets = offsets.to(old.device)
        self.nn_search.bank_offsets = offsets
        self.nn_search.memory_bank = bank.detach().to(device=old.device, dtype=old.dtype)
        self.nn_search.search_choice = None  # made again for the new bank (its size changes the timings)
        self.bank_size = int(bank.shape[0])

    def components(self) -> list[Component]:
        def extract(state: State) -> State:
            return {"embedding": self.feature_extractor(state["image"])}  # (B, D, h, w)

        def search(state: State) -> State:
            patch_scores, pred_score = self.nn_search(state["embedding"])
            return {"patch_scores": patch_scores, "pred_score": pred_score}  # (B,1,h,w), (B,)

        def post(state: State) -> State:
            size = tuple(state["image"].shape[-2:])
            return {"anomaly_map": self.postprocess(state["patch_scores"], size)}  # (B, 1, H, W)

        return [
            Component("feature_extractor", self.feature_extractor, extract),
            Component("nn_search", self.nn_search, search),
            Component("postprocess", self.postprocess, post),
        ]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        self.validate_input_size(x.shape[-2], x.shape[-1])
        state = run_components(self.components(), x)
        return {"anomaly_map": state["anomaly_map"], "pred_score": state["pred_score"]}


# ----------------------------------------------------------------------------------------
# Registered configurations.


@register_model()
def patchcore(
    image_size: int | tuple[int, int] = 256,
    num_train_images: int = 200,
    coreset_ratio: float = 0.1,
    backbone: str = "wide_resnet101_2",
    backbone_weights: str | None = None,
    **kw,
) -> PatchCore:
    """PatchCore-10 on Wide-ResNet-101-2, layers 2+3, 1024-d patches, 10% coreset bank.

    Args:
        image_size: Train/test resolution; sets the bank size.
        num_train_images: Training images behind the bank.
        coreset_ratio: Fraction of their patches kept.
        backbone: Backbone factory name.
        backbone_weights: None (random), ``"DEFAULT"``, a weights name or a path.
        **kw: Other :class:`PatchCoreConfig` fields.
    """
    cfg = PatchCoreConfig(
        backbone=backbone,
        backbone_weights=backbone_weights,
        image_size=_pair(image_size),
        num_train_images=num_train_images,
        coreset_ratio=coreset_ratio,
        **kw,
    )
    return PatchCore(cfg)


@register_model()
def patchcore_wrn50(image_size: int | tuple[int, int] = 256, **kw) -> PatchCore:
    """PatchCore-10 on Wide-ResNet-50-2 (the paper's main-table backbone)."""
    kw.setdefault("backbone", "wide_resnet50_2")
    return patchcore(image_size=image_size, **kw)


@register_model()
def patchcore_tiny(image_size: int | tuple[int, int] = 256, **kw) -> PatchCore:
    """PatchCore on ``resnet_tiny`` (16+32 channels -> 32-d patches), 8-image bank: CPU tests."""
    kw.setdefault("backbone", "resnet_tiny")
    kw.setdefault("num_train_images", 8)
    kw.setdefault("pretrain_embed_dim", 32)
    kw.setdefault("embed_dim", 32)
    return patchcore(image_size=image_size, **kw)
