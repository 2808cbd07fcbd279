"""Labeled Faces in the Wild: file formats, image layout, evaluation, and a synthetic stand-in.

Formats (LFW README, vis-www.cs.umass.edu/lfw/README.txt):

* Images: ``<root>/<name>/<name>_<4-digit n>.jpg``, e.g. ``George_W_Bush/George_W_Bush_0010.jpg``;
  ``<root>`` is the extracted ``lfw`` folder, or ``lfw-deepfunneled`` / ``lfw_funneled``
  for the aligned variants (same names). Passing their parent folder works too.
* ``pairs.txt`` (View 2): header ``10<TAB>300``, then 10 sets, each 300 matched lines
  ``name n1 n2`` followed by 300 mismatched lines ``name1 n1 name2 n2``.
* ``pairsDevTrain.txt`` / ``pairsDevTest.txt`` (View 1): header ``N`` (1100 / 500), then N
  matched and N mismatched lines: one set.
* ``people.txt`` (View 2): header ``10``, then per set a line with its person count followed
  by ``name count`` lines. ``peopleDevTrain.txt`` / ``peopleDevTest.txt``: header ``N``, then
  N ``name count`` lines.

Evaluation (:func:`evaluate_lfw`) embeds every distinct image once, in batches, and reports
the metrics of :mod:`visionscale.face.verification`, with the 10-fold protocol when the
pairs file has several sets.
"""

from __future__ import annotations

from visionscale.errors import InvalidValueError, VisionscaleError, check_int

import csv
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visionscale.face.verification import roc_curve, verification_report
from visionscale.io.atomic import write_atomic
from visionscale.io.images import read_image

__all__ = [
    "LFWError",
    "Pair",
    "PairsFile",
    "parse_pairs",
    "parse_people",
    "image_path",
    "resolve_image_root",
    "missing_images",
    "write_pairs",
    "write_people",
    "evaluate_lfw",
    "LFWResult",
    "write_lfw_outputs",
    "make_synthetic_lfw",
    "IMAGE_FOLDERS",
]

# Folder names the LFW tarballs extract to (original, deep-funneled, funneled).
IMAGE_FOLDERS = ("lfw", "lfw-deepfunneled", "lfw_funneled", "lfw-funneled")


class LFWError(VisionscaleError, ValueError):
    """A malformed LFW file or missing images; the message names the file, line or paths."""


@dataclass(frozen=True)
class Pair:
    name1: str
    n1: int
    name2: str
    n2: int
    fold: int

    @property
    def same(self) -> bool:
        return self.name1 == self.name2


@dataclass
class PairsFile:
    path: Path
    pairs: list[Pair]
    n_folds: int
    per_fold: int  # matched (= mismatched) pairs per fold

    @property
    def same(self) -> np.ndarray:
        return np.array([p.same for p in self.pairs], dtype=bool)

    @property
    def folds(self) -> np.ndarray:
        return np.array([p.fold for p in self.pairs], dtype=np.int64)


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    if not path.is_file():
        raise LFWError(f"LFW file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LFWError(f"{path} is not a text file ({exc})") from None
    return [(i + 1, ln.split()) for i, ln in enumerate(text.splitlines()) if ln.strip()]


def _int(tok: str, path: Path, line: int, what: str) -> int:
    try:
        v = int(tok)
    except ValueError:
        raise LFWError(f"{path}:{line}: {what} {tok!r} is not an integer") from None
    if v < 0:
        raise LFWError(f"{path}:{line}: {what} must not be negative, got {v}")
    return v


def parse_pairs(path: str | os.PathLike) -> PairsFile:
    """Read ``pairs.txt`` (header ``sets per_set``) or ``pairsDev*.txt`` (header ``per_set``).

    Raises:
        LFWError: Bad header, a line with the wrong number of fields or a non-integer image
            number (with ``file:line``), matched/mismatched lines out of order, or a line
            count that does not match the header.
    """
    p = Path(path).expanduser()
    lines = _lines(p)
    if not lines:
        raise LFWError(f"{p} is empty; expected a header line ('10<TAB>300' or '1100')")
    ln0, head = lines[0]
    if len(head) == 2:
        n_sets, per = _int(head[0], p, ln0, "number of sets"), _int(head[1], p, ln0, "pairs per set")
    elif len(head) == 1:
        n_sets, per = 1, _int(head[0], p, ln0, "number of pairs")
    else:
        raise LFWError(f"{p}:{ln0}: header must be 'sets<TAB>pairs_per_set' (pairs.txt) or 'pairs' "
                       f"(pairsDevTrain/Test.txt), got {' '.join(head)!r}")
    if n_sets < 1 or per < 1:
        raise LFWError(f"{p}:{ln0}: header promises no pairs ({' '.join(head)})")
    body = lines[1:]
    expected = n_sets * 2 * per
    if len(body) != expected:
        where = f"ends after line {lines[-1][0]}" if len(body) < expected else f"has more at line {body[expected][0]}"
        raise LFWError(f"{p}: header {' '.join(head)!r} promises {expected} pair lines "
                       f"({n_sets} set(s) x ({per} matched + {per} mismatched)) but the file has "
                       f"{len(body)} ({where})")
    pairs: list[Pair] = []
    for k, (ln, f) in enumerate(body):
        fold, pos = divmod(k, 2 * per)
        matched = pos < per
        if matched:
            if len(f) != 3:
                raise LFWError(f"{p}:{ln}: expected a matched pair 'name n1 n2' (set {fold + 1}, line "
                               f"{pos + 1} of {per} matched), got {len(f)} fields: {' '.join(f)!r}")
            pairs.append(Pair(f[0], _int(f[1], p, ln, "image number"), f[0], _int(f[2], p, ln, "image number"), fold))
        else:
            if len(f) != 4:
                raise LFWError(f"{p}:{ln}: expected a mismatched pair 'name1 n1 name2 n2' (set {fold + 1}, "
                               f"line {pos - per + 1} of {per} mismatched), got {len(f)} fields: {' '.join(f)!r}")
            pairs.append(Pair(f[0], _int(f[1], p, ln, "image number"), f[2], _int(f[3], p, ln, "image number"), fold))
    return PairsFile(p, pairs, n_sets, per)


def parse_people(path: str | os.PathLike) -> list[list[tuple[str, int]]]:
    """Read ``people.txt`` (sets) or ``peopleDev*.txt`` (one list) -> sets of ``(name, count)``."""
    p = Path(path).expanduser()
    lines = _lines(p)
    if not lines:
        raise LFWError(f"{p} is empty; expected a header line")
    ln0, head = lines[0]
    if len(head) != 1:
        raise LFWError(f"{p}:{ln0}: header must be one integer, got {' '.join(head)!r}")
    n = _int(head[0], p, ln0, "count")
    rest = lines[1:]
    # people.txt: the next line is again a single integer (the first set's size).
    nested = bool(rest) and len(rest[0][1]) == 1
    sets: list[list[tuple[str, int]]] = []
    i = 0

    def read_people(count: int) -> list[tuple[str, int]]:
        nonlocal i
        out = []
        for _ in range(count):
            if i >= len(rest):
                raise LFWError(f"{p}: file ends after line {lines[-1][0]} but more people were promised")
            ln, f = rest[i]
            if len(f) != 2:
                raise LFWError(f"{p}:{ln}: expected 'name count', got {' '.join(f)!r}")
            out.append((f[0], _int(f[1], p, ln, "image count")))
            i += 1
        return out

    if nested:
        for _ in range(n):
            if i >= len(rest):
                raise LFWError(f"{p}: header promises {n} sets but the file ends after {len(sets)}")
            ln, f = rest[i]
            if len(f) != 1:
                raise LFWError(f"{p}:{ln}: expected the size of set {len(sets) + 1}, got {' '.join(f)!r}")
            i += 1
            sets.append(read_people(_int(f[0], p, ln, "set size")))
    else:
        sets.append(read_people(n))
    if i != len(rest):
        raise LFWError(f"{p}:{rest[i][0]}: unexpected extra line {' '.join(rest[i][1])!r} after the promised entries")
    return sets


def image_path(root: str | os.PathLike, name: str, n: int) -> Path:
    """``<root>/<name>/<name>_<n:04d>.jpg``."""
    return Path(root) / name / f"{name}_{n:04d}.jpg"


def resolve_image_root(root: str | os.PathLike, names: Sequence[str] = ()) -> Path:
    """The folder that holds the person folders: ``root`` itself or one of its ``lfw*`` children
    (also the doubly nested ``lfw-deepfunneled/lfw-deepfunneled`` of some mirrors)."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise LFWError(f"LFW image folder not found: {base}")
    probe = [n for n in names[:50]]
    if not probe:
        # No names to look for: an extracted lfw*/ folder inside wins over the folder itself.
        nested = [base / f / f for f in IMAGE_FOLDERS] + [base / f for f in IMAGE_FOLDERS]
        return next((c for c in nested if c.is_dir()), base)
    cands = [base] + [base / f for f in IMAGE_FOLDERS] + [base / f / f for f in IMAGE_FOLDERS]
    for c in cands:
        if c.is_dir() and (not probe or any((c / n).is_dir() for n in probe)):
            return c
    raise LFWError(f"no person folders of the pairs file under {base} (looked in {base} and its "
                   f"{', '.join(IMAGE_FOLDERS)} sub-folders for e.g. {probe[0] if probe else '?'}/)")


def missing_images(root: Path, pairs: Sequence[Pair]) -> list[Path]:
    seen: dict[Path, None] = {}
    for pr in pairs:
        for name, n in ((pr.name1, pr.n1), (pr.name2, pr.n2)):
            path = image_path(root, name, n)
            if path not in seen and not path.is_file():
                seen[path] = None
    return list(seen)


# -- writers (for generated trees and subsets) ----------------------------------------------
def write_pairs(path: str | os.PathLike, pairs: Sequence[Pair], n_sets: int, per_set: int, dev_header: bool = False) -> Path:
    """Write pairs in LFW order (per set: matched, then mismatched); atomically."""
    if len(pairs) != n_sets * 2 * per_set:
        raise InvalidValueError(f"{len(pairs)} pairs do not make {n_sets} sets of {per_set} + {per_set}").about("pairs")
    rows = [f"{per_set}" if dev_header else f"{n_sets}\t{per_set}"]
    for pr in pairs:
        rows.append(f"{pr.name1}\t{pr.n1}\t{pr.n2}" if pr.same else f"{pr.name1}\t{pr.n1}\t{pr.name2}\t{pr.n2}")
    write_atomic(path, ("\n".join(rows) + "\n").encode())
    return Path(path)


def write_people(path: str | os.PathLike, sets: Sequence[Sequence[tuple[str, int]]], dev_format: bool = False) -> Path:
    rows: list[str] = []
    if dev_format:
        (people,) = sets
        rows.append(str(len(people)))
        rows += [f"{n}\t{c}" for n, c in people]
    else:
        rows.append(str(len(sets)))
        for s in sets:
            rows.append(str(len(s)))
            rows += [f"{n}\t{c}" for n, c in s]
    write_atomic(path, ("\n".join(rows) + "\n").encode())
    return Path(path)


# -- evaluation ----------------------------------------------------------------------------
@dataclass
class LFWResult:
    report: dict
    distances: np.ndarray
    same: np.ndarray
    folds: np.ndarray
    pairs: list[Pair]
    n_images: int
    roc: tuple[np.ndarray, np.ndarray, np.ndarray] = field(repr=False, default=None)


EmbedFn = Callable[[list[np.ndarray]], np.ndarray]


def evaluate_lfw(root: str | os.PathLike, pairs_file: str | os.PathLike, embed: EmbedFn, batch_size: int = 64,
                 thresholds: Sequence[float] = (0.5,), far: float = 1e-3,
                 progress: Callable[[int, int], None] | None = None) -> LFWResult:
    """Embed every distinct image of the pairs once (in batches) and score the pairs.

    Args:
        root: The LFW image folder (or its parent).
        pairs_file: ``pairs.txt`` (10 folds) or ``pairsDevTest.txt`` (one set).
        embed: ``list of (H, W, 3) uint8 RGB -> (n, D)`` embeddings, e.g. ``FaceEmbedder.embed``.
        thresholds: Fixed thresholds for seed 003's accuracy / precision / recall / F1 table.
        far: Target false-accept rate of TAR @ FAR.

    Raises:
        LFWError: Malformed pairs file, or images it names are missing (all listed, up to 20).
    """
    check_int("batch_size", batch_size, minimum=1)
    pf = parse_pairs(pairs_file)
    names = list(dict.fromkeys(n for pr in pf.pairs for n in (pr.name1, pr.name2)))
    base = resolve_image_root(root, names)
    missing = missing_images(base, pf.pairs)
    if missing:
        shown = "\n  ".join(str(m) for m in missing[:20])
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise LFWError(f"{len(missing)} image(s) named in {pf.path} are missing under {base}:\n  {shown}{more}")
    keys = list(dict.fromkeys(k for pr in pf.pairs for k in ((pr.name1, pr.n1), (pr.name2, pr.n2))))
    index = {k: i for i, k in enumerate(keys)}
    chunks = []
    for s in range(0, len(keys), batch_size):
        imgs = [read_image(image_path(base, n, i)) for n, i in keys[s:s + batch_size]]
        e = np.asarray(embed(imgs), dtype=np.float32)
        if e.ndim != 2 or e.shape[0] != len(imgs):
            raise InvalidValueError(f"embed returned shape {e.shape} for {len(imgs)} images; "
                                    f"expected (n, D)").about("embed")
        chunks.append(e)
        if progress is not None:
            progress(min(s + batch_size, len(keys)), len(keys))
    emb = np.concatenate(chunks, 0)
    i1 = np.array([index[(pr.name1, pr.n1)] for pr in pf.pairs])
    i2 = np.array([index[(pr.name2, pr.n2)] for pr in pf.pairs])
    dist = np.linalg.norm(emb[i1].astype(np.float64) - emb[i2].astype(np.float64), axis=1)
    same, folds = pf.same, pf.folds
    rep = verification_report(dist, same, folds if pf.n_folds > 1 else None, thresholds, far)
    rep.update({"pairs_file": str(pf.path), "image_root": str(base), "n_images_embedded": len(keys),
                "n_folds": pf.n_folds, "pairs_per_fold": 2 * pf.per_fold})
    return LFWResult(rep, dist, same, folds, pf.pairs, len(keys), roc_curve(dist, same))


def write_lfw_outputs(result: LFWResult, out_dir: str | os.PathLike, plot: bool = True, overwrite: bool = False,
                      kind: str = "face-eval-lfw") -> list[Path]:
    """``report.json``, ``pairs.csv`` (distance per pair) and ``roc.png``, all moved into ``out_dir``
    together at the end (:class:`~visionscale.io.outputs.OutputDir`).

    Raises:
        OutputExistsError: ``out_dir`` holds files an earlier evaluation did not write, and
            ``overwrite`` is not set (nothing is written then).
    """
    from visionscale.io.outputs import OutputDir

    d = Path(out_dir).expanduser()
    names = ["report.json", "pairs.csv"] + (["roc.png"] if plot else [])
    with OutputDir(d, kind=kind, overwrite=overwrite) as tmp:
        write_atomic(tmp / "report.json", (json.dumps(result.report, indent=2) + "\n").encode())
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["fold", "name1", "n1", "name2", "n2", "same", "distance"])
        for pr, dist in zip(result.pairs, result.distances):
            w.writerow([pr.fold, pr.name1, pr.n1, pr.name2, pr.n2, int(pr.same), f"{dist:.6f}"])
        write_atomic(tmp / "pairs.csv", buf.getvalue().encode())
        if plot:
            from visionscale.face.plots import roc_png

            fpr, tpr, _ = result.roc
            write_atomic(tmp / "roc.png", roc_png(fpr, tpr, result.report["roc_auc"], result.report["eer"], "LFW pairs"))
    return [d / n for n in names]


# -- synthetic LFW -------------------------------------------------------------------------
def _identity_images(rng: np.random.Generator, n_people: int, per_person: int, size: int) -> list[list[np.ndarray]]:
    """Synthetic "people": one face (scikit-image's astronaut, public domain) under a
    per-identity colour cast and texture; per image a random shift, flip, brightness and noise."""
    from skimage import data
    from skimage.transform import resize

    face = data.astronaut()[20:220, 150:330].astype(np.float32)  # (200, 180, 3) the astronaut's face
    base = resize(face, (size, size), anti_aliasing=True, preserve_range=True)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    people = []
    for i in range(n_people):
        # Colour casts spread around the hue circle (distinct chromaticity per identity).
        hue = 2 * np.pi * (i / n_people) + rng.uniform(-0.1, 0.1)
        gain = 1.0 + 0.45 * np.array([np.cos(hue), np.cos(hue - 2.09), np.cos(hue + 2.09)], np.float32)
        theta, freq = rng.uniform(0, np.pi), rng.uniform(3, 9)
        texture = 25.0 * np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)))
        ident = base * gain + texture[..., None]
        imgs = []
        for _ in range(per_person):
            im = ident * rng.uniform(0.9, 1.1)
            im = np.roll(im, (int(rng.integers(-size // 16, size // 16 + 1)), int(rng.integers(-size // 16, size // 16 + 1))), (0, 1))
            if rng.random() < 0.5:
                im = im[:, ::-1]
            im = im + rng.normal(0, 6.0, im.shape)
            imgs.append(np.clip(im, 0, 255).astype(np.uint8))
        people.append(imgs)
    return people


def make_synthetic_lfw(out: str | os.PathLike, n_people: int = 24, images_per_person: int = 4, size: int = 64,
                       n_sets: int = 10, per_set: int = 10, dev_pairs: int = 20, seed: int = 0,
                       folder: str = "lfw", overwrite: bool = False) -> dict:
    """Write an LFW-shaped tree of synthetic identities, for tests and demos (offline).

    ``<out>/<folder>/<name>/<name>_0001.jpg ...``, ``pairs.txt`` (``n_sets`` x ``per_set`` matched
    + mismatched), ``pairsDevTrain.txt`` / ``pairsDevTest.txt`` (``dev_pairs`` each), ``people.txt``
    (``n_sets`` sets) and ``peopleDevTrain.txt`` / ``peopleDevTest.txt``. Identities differ by
    colour cast and texture, so the right answer of every pair is known and learnable.
    Not faces of real people and not a stand-in for LFW's difficulty.

    Everything is written to a staging folder and moved into ``out`` at the end; an ``out``
    holding files an earlier demo did not write (someone's own ``pairs.txt``) raises
    :class:`~visionscale.errors.OutputExistsError` first, unless ``overwrite``.
    """
    from visionscale.io.outputs import OutputDir

    if n_people < 2 or images_per_person < 2:
        raise LFWError("need at least 2 people with at least 2 images each").about(
            *(["n_people"] if n_people < 2 else []), *(["images_per_person"] if images_per_person < 2 else []))
    check_int("n_people", n_people, minimum=2)
    check_int("images_per_person", images_per_person, minimum=2)
    check_int("size", size, minimum=8)
    for name, value in (("n_sets", n_sets), ("per_set", per_set), ("dev_pairs", dev_pairs)):
        check_int(name, value, minimum=1)
    check_int("seed", seed, minimum=0)
    final = Path(out).expanduser()
    with OutputDir(final, kind="lfw-demo", overwrite=overwrite) as staging:
        info = _write_synthetic_lfw(staging, n_people, images_per_person, size, n_sets, per_set, dev_pairs, seed, folder)
    return {**info, "root": final / folder, "pairs": final / "pairs.txt"}


def _write_synthetic_lfw(base: Path, n_people: int, images_per_person: int, size: int, n_sets: int, per_set: int,
                         dev_pairs: int, seed: int, folder: str) -> dict:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img_root = base / folder
    names = [f"Person_{chr(65 + i % 26)}{i // 26:02d}" for i in range(n_people)]
    people = _identity_images(rng, n_people, images_per_person, size)
    for name, imgs in zip(names, people):
        (img_root / name).mkdir(parents=True, exist_ok=True)
        for j, im in enumerate(imgs, 1):
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="JPEG", quality=95)
            write_atomic(image_path(img_root, name, j), buf.getvalue())

    def draw(n_per: int, fold: int) -> list[Pair]:
        out_pairs = []
        for _ in range(n_per):
            a = names[int(rng.integers(n_people))]
            i, j = rng.choice(images_per_person, 2, replace=False) + 1
            out_pairs.append(Pair(a, int(i), a, int(j), fold))
        for _ in range(n_per):
            a, b = rng.choice(n_people, 2, replace=False)
            out_pairs.append(Pair(names[a], int(rng.integers(1, images_per_person + 1)), names[b],
                                  int(rng.integers(1, images_per_person + 1)), fold))
        return out_pairs

    pairs = [p for k in range(n_sets) for p in draw(per_set, k)]
    write_pairs(base / "pairs.txt", pairs, n_sets, per_set)
    write_pairs(base / "pairsDevTrain.txt", draw(dev_pairs, 0), 1, dev_pairs, dev_header=True)
    write_pairs(base / "pairsDevTest.txt", draw(dev_pairs, 0), 1, dev_pairs, dev_header=True)
    everyone = [(n, images_per_person) for n in names]
    write_people(base / "people.txt", [everyone[k::n_sets] for k in range(n_sets)])
    half = n_people // 2
    write_people(base / "peopleDevTrain.txt", [everyone[:half]], dev_format=True)
    write_people(base / "peopleDevTest.txt", [everyone[half:]], dev_format=True)
    return {"root": img_root, "names": names, "pairs": base / "pairs.txt", "n_images": n_people * images_per_person}
