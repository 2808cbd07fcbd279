"""Greedy k-center coreset subsampling of patch features on a Johnson-Lindenstrauss projection.

Paper: Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022,
Algorithm 1 (greedy coreset on randomly projected features, after Sener & Savarese 2018).
Official code: github.com/amazon-science/patchcore-inspection, ``src/patchcore/sampler.py``
(``ApproximateGreedyCoresetSampler``: features projected to 128 dimensions, the first
min-distances are the mean distance to 10 random starting points, then one greedy pick at a
time).

Same algorithm as the official code; how it differs in the mechanics:

* The projection is a Gaussian JL matrix ``N(0, 1/d)`` drawn from a seeded generator (the
  official code uses a freshly initialised ``nn.Linear``, i.e. a uniform random matrix
  from the global RNG). Features with ``D <= projection_dim`` are not projected at all
  (the official code projects whenever ``D != 128``, even upwards).
* Each greedy step is one fused matrix-vector product ``||x||^2 - 2 X c`` over all points
  (squared distances, norms precomputed) and an in-place running minimum: two (N,)
  temporaries, never an (N, N) matrix and no (N, D) difference tensor per step. On a GPU
  the loop never synchronises with the host (the official ``argmax().item()`` does).
* On a CPU, where that pass is limited by memory bandwidth, points that the triangle
  inequality proves cannot move closer to the new centre are skipped (Elkan's bound, see
  :func:`_greedy_pruned`): the same picks, from a fraction of the distance evaluations on
  real patch features.
* The size is ``max(1, round(ratio * N))`` (official: ``int(ratio * N)``), which is the
  bank size :meth:`visionscale.anomaly.patchcore.PatchCore.bank_size_for` assumes.
* Distances are taken relative to the points' mean. Patch features share a large common
  offset (``||x||^2`` around 700 for WRN-50 features, also after the projection) while the
  distances that decide late picks are far smaller, so ``||x||^2 - 2 x.c + ||c||^2`` in
  float32 cancels most of its digits, and the float32 selection left the float64 one after
  a few hundred picks. Centring is done without a centred copy of the (N, d) points: with
  ``x' = x - mean`` and ``c' = c - mean``, ``||x' - c'||^2 = ||x'||^2 - 2 x.c' + (||c'||^2
  + 2 mean.c')``, where ``||x'||^2`` is computed once from the differences themselves.
  Measured: on 2,000 points in 64-d with ``||x||^2 ~ 700`` the float32 picks left the
  float64 ones after 230 picks, now all 500 agree; on 20,000 points in 128-d, after 793
  picks, now after 1,538 (of 3,000). Identical points now come out at a rounding-sized
  distance instead of an exact 0, so "same point" means closer than that rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["coreset_size", "random_projection", "project", "greedy_kcenter", "coreset_indices"]

DEFAULT_PROJECTION_DIM = 128
DEFAULT_STARTING_POINTS = 10
_CHUNK_ROWS = 65536  # rows per step when projecting or measuring start distances


def coreset_size(num_points: int, ratio: float) -> int:
    """Points a coreset of ``ratio`` keeps out of ``num_points``: ``max(1, round(ratio * N))``."""
    if not 0 < ratio <= 1:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    if num_points < 1:
        raise ValueError("cannot take a coreset of zero points")
    return min(num_points, max(1, round(ratio * num_points)))


def random_projection(dim_in: int, dim_out: int = DEFAULT_PROJECTION_DIM, seed: int = 0,
                      device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor | None:
    """Gaussian JL matrix (dim_in, dim_out) with entries N(0, 1/dim_out), or None if dim_in <= dim_out.

    ``x @ P`` preserves pairwise distances up to a factor 1 +- eps with high probability
    (Johnson-Lindenstrauss); drawn on the CPU from ``seed`` so it is the same everywhere.
    """
    if dim_out < 1:
        raise ValueError(f"projection dimension must be >= 1, got {dim_out}")
    if dim_in <= dim_out:
        return None
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(dim_in, dim_out, generator=g, dtype=torch.float64) / dim_out**0.5
    return p.to(device=device, dtype=dtype)


def project(x: Tensor, projection: Tensor | None) -> Tensor:
    """(N, D) -> (N, d) in row chunks (no (N, D) temporary beyond the input)."""
    if projection is None:
        return x
    out = x.new_empty((x.shape[0], projection.shape[1]))
    for s in range(0, x.shape[0], _CHUNK_ROWS):
        torch.mm(x[s : s + _CHUNK_ROWS], projection, out=out[s : s + _CHUNK_ROWS])
    return out


def greedy_kcenter(
    x: Tensor,
    k: int,
    num_starting_points: int = DEFAULT_STARTING_POINTS,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    prune: bool | None = None,
    stats: dict | None = None,
) -> Tensor:
    """Greedy k-center selection: repeatedly take the point farthest from those taken.

    Args:
        x: (N, d) points (already projected), float32/64, any device.
        k: Points to select (clipped to N).
        num_starting_points: The first min-distances are the mean distance to this many
            random points (the official "approximate" start; those points are not
            selected). 0 starts from one random point, which is then selected first.
        seed: Seeds the choice of starting points.
        progress: Called as ``progress(done, k)`` about 100 times.
        prune: Skip points the triangle inequality proves cannot get closer to the new
            centre (see :func:`_greedy_pruned`). Same picks; faster on real features on a
            CPU, where each full pass is limited by memory bandwidth. Default: on for CPU
            tensors, off on GPUs (a full pass there costs microseconds).
        stats: If given, receives ``candidate_fraction``: the share of point-distance
            evaluations a full pass per pick would have made that were actually made.

    Returns:
        (k',) int64 indices on ``x``'s device, in selection order, without repeats
        (k' < k only when fewer than k distinct points exist; points closer than float
        rounding of the distances, :func:`_same_point_sq`, count as one).
    """
    if x.dim() != 2:
        raise ValueError(f"expected (N, d) points, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if n == 0:
        raise ValueError("cannot select from zero points")
    k = min(int(k), n)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k == n:
        return torch.arange(n, device=x.device)
    if prune is None:
        prune = x.device.type == "cpu"
    g = torch.Generator().manual_seed(seed)
    mean = x.mean(dim=0)  # (d,) every distance below is taken between points centred on it
    sq = _centred_sq(x, mean)  # (N,) ||x - mean||^2
    m = min(num_starting_points, n)
    first = None
    if m > 0:
        starts = torch.randperm(n, generator=g)[:m].to(x.device)
        anchors, a_const = _centred(x, mean, sq, starts)  # (m, d), (m,)
        min_d = torch.empty_like(sq)  # (N,) mean Euclidean distance to the start points
        for s in range(0, n, _CHUNK_ROWS):
            block = torch.addmm(a_const.unsqueeze(0), x[s : s + _CHUNK_ROWS], anchors.T, alpha=-2)  # (c, m)
            block.add_(sq[s : s + _CHUNK_ROWS].unsqueeze(1)).clamp_min_(0).sqrt_()
            min_d[s : s + _CHUNK_ROWS] = block.mean(dim=1)
    else:
        first = int(torch.randint(n, (1,), generator=g))
        min_d = torch.full_like(sq, float("inf"))
    every = max(1, k // 100)
    tick = (lambda i: progress(i, k) if i % every == 0 or i == k else None) if progress else (lambda i: None)
    # On a CPU every pick is a handful of small ops (the full pass is memory-bound and no
    # faster on two threads): one intra-op thread avoids waiting on the others, which on a
    # loaded machine made a pick 4x slower. The caller's setting is restored afterwards.
    threads = torch.get_num_threads()
    if x.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        if prune:
            selected, picked, frac = _greedy_pruned(x, mean, sq, min_d, k, first, tick)
        else:
            (selected, picked), frac = _greedy_full(x, mean, sq, min_d.square_(), k, first, tick), 1.0
    finally:
        torch.set_num_threads(threads)
    if stats is not None:
        stats["candidate_fraction"] = frac
    # Once every distinct point is covered, the farthest point is at distance 0 up to
    # rounding (a duplicate of a pick, or a pick again): drop those picks. The distances at
    # pick time never increase, so they are a suffix; the first pick always stays.
    floor = _same_point_sq(x, mean, sq)
    real = max(1, int((picked > floor).sum()))
    uniq, picks = _first_occurrences(selected[:real])
    if uniq == k or m == 0:
        return picks
    # The approximate start can leave points "covered" only by a start point, which is
    # never put in the bank (e.g. most patches identical): measure true distances to the
    # picks and go on greedily until every distinct point is represented or k is reached.
    min_sq = torch.full_like(sq, float("inf"))
    tmp = torch.empty_like(sq)
    for j in picks:
        _update(x, mean, sq, j, tmp, min_sq)
    extra = [picks]
    for _ in range(k - uniq):
        j = torch.argmax(min_sq)
        if float(min_sq[j]) <= floor:
            break
        extra.append(j.view(1))
        _update(x, mean, sq, j, tmp, min_sq)
    return torch.cat(extra)


def _same_point_sq(x: Tensor, mean: Tensor, sq: Tensor) -> float:
    """Squared distance below which two points are the same up to the rounding of the centred formula.

    ``sq - 2 x.c' + (||c'||^2 + 2 mean.c')`` rounds with a few ``eps`` of its terms'
    magnitudes, ``||x'||^2 + ||x|| ||c'|| + ||c'||^2``, times ~sqrt(d) for the dot product's
    sums; bounded here with the largest centred norm ``r`` and ``||x|| <= ||mean|| + r``.
    Identical points get this instead of an exact 0.
    """
    r2 = float(sq.max())
    r = r2**0.5
    eps = torch.finfo(x.dtype).eps if x.dtype.is_floating_point else 0.0
    return 4 * x.shape[1] ** 0.5 * eps * (2 * r2 + 2 * r * (float(torch.linalg.vector_norm(mean)) + r))


def _centred_sq(x: Tensor, mean: Tensor) -> Tensor:
    """(N,) ``||x - mean||^2`` from the differences themselves, in row chunks."""
    out = x.new_empty(x.shape[0])
    for s in range(0, x.shape[0], _CHUNK_ROWS):
        out[s : s + _CHUNK_ROWS] = torch.linalg.vector_norm(x[s : s + _CHUNK_ROWS] - mean, dim=1).square()
    return out


def _centred(x: Tensor, mean: Tensor, sq: Tensor, j: Tensor | int) -> tuple[Tensor, Tensor]:
    """Centred centre(s) ``c' = x[j] - mean`` and the constant ``||c'||^2 + 2 mean.c'``.

    ``||(x - mean) - c'||^2 = sq - 2 x.c' + constant`` for every point x: one matrix-vector
    product with the raw points, whose large common offset no longer cancels digits.
    """
    c = x[j] - mean  # (d,) or (m, d)
    return c, sq[j] + 2 * (c @ mean)


def _greedy_full(x: Tensor, mean: Tensor, sq: Tensor, min_sq: Tensor, k: int, first: int | None,
                 tick) -> tuple[Tensor, Tensor]:
    """One fused pass over all points per pick, in squared distances; no host sync on a GPU.

    Returns the picks and each pick's squared distance to the earlier ones when picked.
    """
    selected = torch.empty(k, dtype=torch.int64, device=x.device)
    picked = sq.new_empty(k)
    tmp = torch.empty_like(sq)  # (N,) squared distances to the newest centre
    for i in range(k):
        j = torch.tensor(first, device=x.device) if (i == 0 and first is not None) else torch.argmax(min_sq)
        selected[i] = j
        picked[i] = min_sq[j]
        _update(x, mean, sq, j, tmp, min_sq)
        tick(i + 1)
    return selected, picked


_PROBE_EVERY = 64  # picks between checks whether pruning pays
_PRUNE_BELOW = 0.3  # prune while fewer than this share of points are candidates
_SLACK = 1 + 1e-4  # float32 rounding: prune only with a margin


def _greedy_pruned(x: Tensor, mean: Tensor, sq: Tensor, min_d: Tensor, k: int, first: int | None,
                   tick) -> tuple[Tensor, Tensor, float]:
    """Greedy k-center that skips points the triangle inequality rules out (Elkan's bound).

    Each point remembers its nearest centre ``a(x)`` and distance ``min_d(x)``. A new
    centre c can only come closer than ``min_d(x)`` if ``d(a(x), c) < 2 min_d(x)``, since
    ``d(x, c) >= d(a(x), c) - min_d(x)``. So a pick costs distances from c to the centres
    so far (k x d), one pass over two small per-point arrays, and the d-dim distances of
    the candidates only, instead of a pass over all N x d features. Points whose
    ``min_d`` still comes from the approximate start (no centre yet) are always
    candidates. Every 64 picks the share of candidates is checked; above 30% (early picks,
    or features without structure, e.g. i.i.d. noise) full passes are cheaper and used.
    The picks are those of the full algorithm (up to float rounding on exact ties).

    Returns the picks, each pick's squared distance to the earlier ones when picked (as
    :func:`_greedy_full`), and the share of distances evaluated.
    """
    n, dim = x.shape
    selected = torch.empty(k, dtype=torch.int64)
    picked = min_d.new_empty(k)
    centres = x.new_empty((k, dim))  # centred on ``mean``
    csq = x.new_empty(k)
    dc = x.new_full((k + 1,), -1.0)  # distance of each centre to the new one; slot k (= "none yet") stays -1
    assign = torch.full((n,), k, dtype=torch.int64)
    full, evaluated = True, 0
    for i in range(k):
        j = first if (i == 0 and first is not None) else int(torch.argmax(min_d))
        selected[i] = j
        picked[i] = min_d[j]
        c, const = _centred(x, mean, sq, j)  # (d,) centred, and ||c||^2 + 2 mean.c
        if i and (not full or i % _PROBE_EVERY == 0):
            torch.addmv(csq[:i], centres[:i], c, alpha=-2, out=dc[:i])  # both sides centred
            dc[:i].add_(sq[j]).clamp_min_(0).sqrt_()
            cand = (dc[assign] < min_d * (2 * _SLACK)).nonzero().squeeze(1)  # (C,)
            if i % _PROBE_EVERY == 0:
                full = cand.numel() > _PRUNE_BELOW * n
        if full:
            dist = torch.addmv(sq, x, c, alpha=-2).add_(const).clamp_min_(0).sqrt_()  # (N,)
            idx = (dist < min_d).nonzero().squeeze(1)
            newd = dist[idx]
            evaluated += n
        else:
            dist = torch.addmv(sq[cand], x[cand], c, alpha=-2).add_(const).clamp_min_(0).sqrt_()  # (C,)
            better = dist < min_d[cand]
            idx, newd = cand[better], dist[better]
            evaluated += cand.numel()
        min_d[idx] = newd
        assign[idx] = i
        min_d[j] = 0.0
        assign[j] = i
        centres[i] = c
        csq[i] = sq[j]
        tick(i + 1)
    return selected.to(x.device), picked.square_().to(x.device), evaluated / (k * n)


def _update(x: Tensor, mean: Tensor, sq: Tensor, j: Tensor, tmp: Tensor, min_sq: Tensor) -> None:
    """min_sq = min(min_sq, ||x - x_j||^2) in place, in centred coordinates (see :func:`_centred`)."""
    c, const = _centred(x, mean, sq, j)
    torch.addmv(sq, x, c, alpha=-2, out=tmp)  # (N,)
    tmp.add_(const)
    torch.minimum(min_sq, tmp, out=min_sq)
    min_sq.index_fill_(0, j.view(1), 0.0)  # exactly zero for the centre itself (rounding)


def _first_occurrences(idx: Tensor) -> tuple[int, Tensor]:
    uniq, inverse = torch.unique(idx, return_inverse=True)
    if uniq.numel() == idx.numel():
        return idx.numel(), idx
    pos = torch.arange(idx.numel(), device=idx.device)
    first = torch.full((uniq.numel(),), idx.numel(), dtype=torch.int64, device=idx.device)
    first.scatter_reduce_(0, inverse, pos, reduce="amin")
    return uniq.numel(), idx[first.sort().values]


def coreset_indices(
    features: Tensor,
    ratio: float,
    projection_dim: int = DEFAULT_PROJECTION_DIM,
    num_starting_points: int = DEFAULT_STARTING_POINTS,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Indices of a greedy coreset of ``ratio`` of the (N, D) ``features`` (JL-projected first)."""
    k = coreset_size(features.shape[0], ratio)
    p = random_projection(features.shape[1], projection_dim, seed, features.device, features.dtype)
    return greedy_kcenter(project(features, p), k, num_starting_points, seed, progress)
