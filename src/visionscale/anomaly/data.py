"""Anomaly-detection data: the MVTec AD layout, a plain folder layout, reading and preprocessing.

MVTec AD layout (Bergmann et al., CVPR 2019), one folder per category::

    <root>/<category>/train/good/*.png           normal parts (training)
    <root>/<category>/test/good/*.png            normal parts (testing)
    <root>/<category>/test/<defect>/<id>.png     defective parts, one folder per defect type
    <root>/<category>/ground_truth/<defect>/<id>_mask.png   masks, nonzero = defect

``root`` may also be the category folder itself.

Plain folder layout::

    <root>/normal/        normal parts (training)
    <root>/normal_test/   optional: normal parts for testing
    <root>/abnormal/      optional: defective parts (testing); subfolders name defect types
    <root>/masks/         optional: masks for abnormal/, same relative path and stem
                          (``x.png`` or ``x_mask.png``, any image suffix)

Without ``normal_test/``, when ``abnormal/`` exists, a seeded ``holdout_fraction`` (20%)
of ``normal/`` is moved to the test set so image AUROC has normal images to rank.

Every image becomes RGB through :func:`visionscale.io.images.read_image_and_size` (grayscale,
RGBA, EXIF orientation): uint8 for files with at most 8 bits per sample, float32 in ``[0, 1]``
for 16-bit and float files, so their precision reaches the model (8-bit files give the same
tensors as before, bit for bit). Then :func:`to_model_input` resizes it to the model size and
normalises it with the ImageNet mean and std, in torch. Before that, :func:`read_for_size`
shrinks an image at least 2 x :data:`READ_MARGIN` times the model size by a whole factor
(8-bit files in 8 bits, 16-bit files in 16 bits), so a huge file never becomes a full-size
float tensor; smaller images (MVTec's 1024 px at 256, say) are read exactly as before.
Masks are read as 8 bits: any channel > 127 is a defect (a 16-bit mask: a value above half
its range, 32767).

API for reading (the stages of ``ad fit / predict / eval`` build on these):

* ``read_for_size(path, size, *, white_level=None) -> (array, (H, W))``: uint8 or float32
  ``(H', W', 3)`` and the file's own size;
* ``to_model_input(image, size) -> Tensor (3, h, w)``: uint8 or float ``[0, 1]`` input;
* ``load_mask(path, size) -> Tensor (h, w) bool``;
* ``iter_batches(samples, size, batch_size, *, skip_bad=False, log=None, with_masks=False,
  workers=0, white_level=None) -> Iterator[Batch]``: ``workers`` >= 2 reads, resizes and
  normalises that many images at once in threads (:func:`visionscale.io.prefetch.ordered_map`,
  at most ``2 * workers`` images in flight), in the same order and with the same
  ``skip_bad`` behaviour as ``workers=0``.
"""

from __future__ import annotations

from visionscale.errors import VisionscaleError

import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from visionscale.errors import InvalidValueError, check_int
from visionscale.io.images import IMAGE_SUFFIXES, ImageReadError, list_images, read_image_and_size
from visionscale.io.prefetch import ordered_map
from visionscale.modelinfo import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataError",
    "Sample",
    "ADDataset",
    "find_categories",
    "load_dataset",
    "image_size_of",
    "check_mask_sizes",
    "to_model_input",
    "read_for_size",
    "READ_MARGIN",
    "load_mask",
    "ReadLog",
    "Batch",
    "iter_batches",
    "pair",
]

# Images are shrunk in PIL only while they stay at least this many times the model size, so
# the final antialiased resize still does the real filtering.
READ_MARGIN = 4
SKIP_HINT = "set skip_bad to continue without it; unreadable files are then listed at the end"


class DataError(VisionscaleError, ValueError):
    """The data folder cannot be used as given; the message says what to fix."""


@dataclass(frozen=True)
class Sample:
    """One image. ``label``: 0 normal, 1 anomalous. ``mask``: ground-truth file or None."""

    path: Path
    label: int
    defect: str = "good"
    mask: Path | None = None


@dataclass
class ADDataset:
    """Training and test samples of one category, and notes for the user."""

    root: Path
    layout: str  # "mvtec" or "folder"
    category: str | None
    train: list[Sample]
    test: list[Sample]
    notes: list[str] = field(default_factory=list)

    @property
    def test_has_labels(self) -> bool:
        """Both normal and anomalous test images exist (AUROC and an F1 threshold are defined)."""
        labels = {s.label for s in self.test}
        return labels == {0, 1}

    def missing_masks(self) -> list[Sample]:
        """Anomalous test images without a ground-truth mask."""
        return [s for s in self.test if s.label == 1 and s.mask is None]

    @property
    def test_has_masks(self) -> bool:
        """Every anomalous test image has a mask (pixel metrics are defined)."""
        return any(s.label == 1 for s in self.test) and not self.missing_masks()

    def mask_note(self) -> str | None:
        """Why pixel metrics will be skipped, or None if they will not."""
        if not any(s.label == 1 for s in self.test):
            return None
        missing = self.missing_masks()
        if not missing:
            return None
        n_anom = sum(s.label == 1 for s in self.test)
        return (f"pixel metrics skipped: {len(missing)} of {n_anom} anomalous test images have no "
                f"ground-truth mask (e.g. {missing[0].path})")


def pair(size: int | Sequence[int]) -> tuple[int, int]:
    """``256`` -> ``(256, 256)``; ``(h, w)`` unchanged."""
    if isinstance(size, int):
        h = w = size
    else:
        h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    return h, w


# ----------------------------------------------------------------------------------------
# Layouts.


def _is_mvtec_category(path: Path) -> bool:
    return (path / "train").is_dir() or ((path / "test").is_dir() and (path / "ground_truth").is_dir())


def find_categories(root: str | Path) -> list[str]:
    """Sub-folders of ``root`` laid out as MVTec categories, sorted."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and _is_mvtec_category(p))


def load_dataset(
    root: str | Path,
    category: str | None = None,
    *,
    require_train: bool = True,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    check_masks: bool = True,
) -> ADDataset:
    """Find the training and test images under ``root`` (MVTec or plain folder layout).

    Args:
        root: Dataset folder (MVTec root, an MVTec category, or a plain folder dataset).
        category: MVTec category; needed when ``root`` holds several.
        require_train: Raise if there are no training images (fit); False for evaluation.
        holdout_fraction: Plain layout without ``normal_test/``: share of ``normal/`` moved
            to the test set (seeded) when ``abnormal/`` exists.
        seed: Seeds that split.
        check_masks: Compare each mask's size with its image's (file headers only).

    Raises:
        DataError: Missing or empty folders, ambiguous category, mask/image size mismatch.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"data path is not a folder: {root}")
    if category is not None:
        cat_dir = root / category
        if root.name == category and _is_mvtec_category(root):
            cat_dir = root
        if not cat_dir.is_dir():
            found = find_categories(root)
            raise DataError(f"category {category!r} not found in {root}" +
                            (f" (found: {', '.join(found)})" if found else ""))
        ds = _load_mvtec(cat_dir, require_train)
    elif _is_mvtec_category(root):
        ds = _load_mvtec(root, require_train)
    elif (root / "normal").is_dir() or (root / "abnormal").is_dir():
        ds = _load_folder(root, require_train, holdout_fraction, seed)
    else:
        cats = find_categories(root)
        if len(cats) == 1:
            ds = _load_mvtec(root / cats[0], require_train)
            ds.notes.insert(0, f"using category {cats[0]!r}, the only one in {root}")
        elif cats:
            raise DataError(f"{root} holds {len(cats)} MVTec categories ({', '.join(cats)}): choose a category").about(
                "category")
        else:
            raise DataError(
                f"no anomaly-detection data found in {root}: expected the MVTec AD layout "
                f"(<category>/train/good, <category>/test/<good|defect>, <category>/ground_truth/<defect>) "
                f"or the folder layout (normal/, optional normal_test/, abnormal/, masks/)"
            )
    if check_masks:
        check_mask_sizes(ds.test)
    return ds


def _images(folder: Path, recursive: bool = False) -> list[Path]:
    return list_images(folder, recursive=recursive) if folder.is_dir() else []


def _no_train(where: Path, expected: Path) -> DataError:
    if not expected.exists():
        return DataError(f"training folder missing: {expected} (put the normal, defect-free images for {where} there)")
    return DataError(f"training folder is empty: {expected} has no images ({', '.join(IMAGE_SUFFIXES[:4])}...)")


def _load_mvtec(cat: Path, require_train: bool) -> ADDataset:
    train_dir = cat / "train" / "good"
    train = [Sample(p, 0) for p in _images(train_dir)]
    if require_train and not train:
        raise _no_train(cat, train_dir)
    test: list[Sample] = []
    notes: list[str] = []
    test_dir = cat / "test"
    gt_dir = cat / "ground_truth"
    if test_dir.is_dir():
        for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            defect = defect_dir.name
            for p in _images(defect_dir):
                if defect == "good":
                    test.append(Sample(p, 0, "good"))
                else:
                    test.append(Sample(p, 1, defect, _find_mask(gt_dir / defect, p.stem)))
    else:
        notes.append(f"no test folder ({test_dir}): nothing to evaluate or calibrate on but training images")
    return ADDataset(cat, "mvtec", cat.name, train, test, notes)


def _find_mask(folder: Path, stem: str) -> Path | None:
    if not folder.is_dir():
        return None
    for name in (f"{stem}_mask", stem):
        for suffix in IMAGE_SUFFIXES:
            for cand in (folder / f"{name}{suffix}", folder / f"{name}{suffix.upper()}"):
                if cand.is_file():
                    return cand
    return None


def _load_folder(root: Path, require_train: bool, holdout_fraction: float, seed: int) -> ADDataset:
    notes: list[str] = []
    normal = [Sample(p, 0) for p in _images(root / "normal")]
    if require_train and not normal:
        raise _no_train(root, root / "normal")
    abnormal_dir, mask_dir = root / "abnormal", root / "masks"
    abnormal = []
    for p in _images(abnormal_dir, recursive=True):
        rel = p.relative_to(abnormal_dir)
        defect = rel.parts[0] if len(rel.parts) > 1 else "abnormal"
        abnormal.append(Sample(p, 1, defect, _find_mask(mask_dir / rel.parent, p.stem)))
    test_normal = [Sample(p, 0) for p in _images(root / "normal_test")]
    train = normal
    if not test_normal and abnormal and len(normal) >= 2 and holdout_fraction > 0:
        n_hold = max(1, round(holdout_fraction * len(normal)))
        n_hold = min(n_hold, len(normal) - 1)
        picked = set(random.Random(seed).sample(range(len(normal)), n_hold))
        test_normal = [s for i, s in enumerate(normal) if i in picked]
        train = [s for i, s in enumerate(normal) if i not in picked]
        notes.append(f"no normal_test/ folder: {n_hold} of {len(normal)} normal images (seeded) "
                     f"moved to the test set so image AUROC has normal images to rank")
    return ADDataset(root, "folder", None, train, test_normal + abnormal, notes)


# ----------------------------------------------------------------------------------------
# Sizes and masks.


def image_size_of(path: Path) -> tuple[int, int] | None:
    """(H, W) after EXIF orientation, from the file header; None if the header is unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            w, h = img.size
            try:
                orientation = img.getexif().get(0x0112, 1)
            except Exception:  # broken EXIF block: read_image would ignore it as well
                orientation = 1
    except Exception:
        return None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def check_mask_sizes(samples: Sequence[Sample]) -> None:
    """Raise :class:`DataError` listing masks whose size differs from their image's."""
    bad = []
    for s in samples:
        if s.mask is None:
            continue
        img, msk = image_size_of(s.path), image_size_of(s.mask)
        if img is None or msk is None:
            continue  # unreadable: reported by path when it is read
        if img != msk:
            bad.append(f"{s.mask} is {msk[1]}x{msk[0]} but its image {s.path} is {img[1]}x{img[0]} (WxH)")
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise DataError(f"{len(bad)} ground-truth masks differ in size from their images: " + "; ".join(bad[:3]) + more)


# ----------------------------------------------------------------------------------------
# Tensors.


def read_for_size(path: Path, size: int | tuple[int, int], *,
                  white_level: float | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """``path`` as an (H', W', 3) RGB array shrunk while it stays >= READ_MARGIN x ``size``, and
    the file's own (H, W).

    The array is uint8 for files with at most 8 bits per sample and float32 in ``[0, 1]`` for
    16-bit and float files (``white_level``: the value read as 1.0 in those, e.g. 4095 for
    12-bit data; see :func:`visionscale.io.images.read_image_float`). Both go to
    :func:`to_model_input`. Raises :class:`ImageReadError` naming the file.
    """
    h, w = pair(size)
    return read_image_and_size(path, min_size=(READ_MARGIN * h, READ_MARGIN * w), dtype=None,
                               white_level=white_level)


def to_model_input(image: np.ndarray, size: int | tuple[int, int]) -> Tensor:
    """(H, W, 3) RGB -> (3, h, w) float32: antialiased bilinear resize, ImageNet normalisation.

    ``image`` is uint8 (divided by 255) or float in ``[0, 1]`` (used as it is, in float32);
    a uint8 array and the same array / 255 in float32 give bit-identical tensors.
    """
    h, w = pair(size)
    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidValueError(f"image must be (H, W, 3), got shape {image.shape}").about("image")
    if image.dtype == np.uint8:
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0).float().div_(255)
    elif np.issubdtype(image.dtype, np.floating):
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)
    else:
        raise InvalidValueError(f"image must be uint8 or float in [0, 1], got {image.dtype}").about("image")
    # x: (1, 3, H, W) in [0, 1]
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std)[0]


def load_mask(path: Path, size: int | tuple[int, int]) -> Tensor:
    """Mask file -> (h, w) bool at the model size (nearest neighbour); any channel > 127 = defect.

    Read as 8 bits whatever the file holds, so a 16-bit mask marks values above half its
    range (``round(v / 257) > 127``, i.e. ``v >= 32768``).
    """
    h, w = pair(size)
    # (H, W); huge masks box-averaged first
    m = read_image_and_size(path, min_size=(READ_MARGIN * h, READ_MARGIN * w), dtype=np.uint8)[0].max(axis=2) > 127
    t = torch.from_numpy(m)[None, None].float()
    if tuple(t.shape[-2:]) != (h, w):
        t = F.interpolate(t, size=(h, w), mode="nearest")
    return t[0, 0] > 0.5


@dataclass
class ReadLog:
    """What reading saw: unreadable files (with ``skip_bad``) and the image sizes met."""

    bad: list[tuple[Path, str]] = field(default_factory=list)
    sizes: Counter = field(default_factory=Counter)

    def size_note(self, target: tuple[int, int]) -> str | None:
        """A note when images came in several sizes or differ from the model size."""
        if not self.sizes:
            return None
        fmt = ", ".join(f"{w}x{h} ({n})" for (h, w), n in self.sizes.most_common(4))
        more = f" and {len(self.sizes) - 4} more" if len(self.sizes) > 4 else ""
        th, tw = target
        if len(self.sizes) > 1:
            return f"images come in {len(self.sizes)} sizes (WxH: {fmt}{more}); all are resized to {tw}x{th}"
        (only,) = self.sizes
        if only != (th, tw):
            return f"images are {only[1]}x{only[0]}; resized to the model size {tw}x{th}"
        return None

    def bad_note(self) -> str | None:
        if not self.bad:
            return None
        listing = "; ".join(f"{p} ({why})" for p, why in self.bad[:10])
        more = f" (+{len(self.bad) - 10} more)" if len(self.bad) > 10 else ""
        return f"skipped {len(self.bad)} unreadable image(s): {listing}{more}"


@dataclass
class Batch:
    images: Tensor  # (B, 3, h, w) normalised
    samples: list[Sample]
    masks: Tensor | None = None  # (B, h, w) bool; all False for images without a mask


def _short_reason(exc: Exception) -> str:
    text = str(exc)
    return text.split(": ", 2)[-1] if text.startswith("cannot read image") else text


def iter_batches(
    samples: Sequence[Sample],
    size: int | tuple[int, int],
    batch_size: int,
    *,
    skip_bad: bool = False,
    log: ReadLog | None = None,
    with_masks: bool = False,
    workers: int = 0,
    white_level: float | None = None,
) -> Iterator[Batch]:
    """Read, resize and normalise ``samples`` in batches of ``batch_size``.

    A file that cannot be read raises :class:`DataError` naming it, unless ``skip_bad``:
    then it is left out and recorded in ``log.bad``. Masks of anomalous samples without a
    mask file (and of all normal samples) are all False.

    ``workers`` >= 2 prepares that many images at once in threads (decoding, resizing and
    normalising release the GIL), at most ``2 * workers`` ahead of the batch being built;
    batches, their order, ``log`` and errors are the same as with ``workers=0`` (inline).
    ``white_level``: see :func:`read_for_size`.
    """
    check_int("batch_size", batch_size, minimum=1)
    check_int("workers", workers, minimum=0)
    hw = pair(size)
    log = log if log is not None else ReadLog()
    samples = samples if isinstance(samples, Sequence) else list(samples)  # zipped with the results below

    def prepare(s: Sample) -> tuple[Tensor, Tensor | None, tuple[int, int]]:
        arr, file_size = read_for_size(s.path, hw, white_level=white_level)
        mask = load_mask(s.mask, hw) if (with_masks and s.mask is not None) else None
        return to_model_input(arr, hw), mask, file_size

    imgs: list[Tensor] = []
    masks: list[Tensor] = []
    kept: list[Sample] = []
    for s, res in zip(samples, ordered_map(prepare, samples, workers, return_exceptions=True)):
        if isinstance(res, ImageReadError):
            if not skip_bad:
                raise DataError(f"{res}; {SKIP_HINT}").about("skip_bad") from None
            log.bad.append((s.path if str(s.path) in str(res) else s.mask, _short_reason(res)))
            continue
        if isinstance(res, Exception):
            raise res
        x, mask, file_size = res
        log.sizes[file_size] += 1
        imgs.append(x)
        if with_masks:
            masks.append(mask if mask is not None else torch.zeros(hw, dtype=torch.bool))
        kept.append(s)
        if len(kept) == batch_size:
            yield Batch(torch.stack(imgs), kept, torch.stack(masks) if with_masks else None)
            imgs, masks, kept = [], [], []
    if kept:
        yield Batch(torch.stack(imgs), kept, torch.stack(masks) if with_masks else None)
