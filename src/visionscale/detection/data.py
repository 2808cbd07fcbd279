"""Detection datasets in memory: one record per image, boxes in pixels, problems kept.

Readers (:mod:`.coco`, :mod:`.widerface`) build a :class:`DetectionDataset`; the trainer
turns it into fixed-size image tensors with :class:`ImageCache`; the evaluator turns it
back into a COCO ground-truth dict for pycocotools with :func:`to_coco_gt`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from visionscale.errors import VisionscaleError

__all__ = ["AnnotationError", "ImageRecord", "DetectionDataset", "ImageCache", "read_rgb", "image_size_of", "to_coco_gt"]


# Largest image side (px) an annotation may state or imply; beyond it the file is wrong.
MAX_SIDE = 1 << 20


class AnnotationError(VisionscaleError, ValueError):
    """An annotation file cannot be used; the message names the file and the entry."""


@dataclass
class ImageRecord:
    """One image and its boxes.

    Attributes:
        image_id: Id used in COCO results (the COCO image id, or a running number).
        path: Image file.
        width, height: Size of the stored image in pixels.
        boxes: (N, 4) float32 xyxy pixels.
        labels: (N,) int64 contiguous class indices 0..C-1.
        ignore: (N,) bool; crowd / invalid boxes that neither count as positives nor as
            misses (COCO ``iscrowd``, WIDER FACE ``invalid``).
        ann_ids: (N,) int64 annotation ids (COCO ids, or the face's index in WIDER FACE).
    """

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray
    ann_ids: np.ndarray


@dataclass
class DetectionDataset:
    """Images with boxes, the class names, and what was wrong with the source.

    Attributes:
        records: One per image, in file order.
        class_names: Index -> name.
        category_ids: Index -> original COCO category id (for exporting results).
        problems: Human-readable messages for entries that were skipped (bad boxes,
            unknown images); each names the annotation file and the entry's id.
        source: The annotation file.
    """

    records: list[ImageRecord]
    class_names: list[str]
    category_ids: list[int]
    problems: list[str] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_boxes(self) -> int:
        return int(sum(len(r.boxes) for r in self.records))

    def subset(self, indices: list[int]) -> "DetectionDataset":
        return DetectionDataset([self.records[i] for i in indices], self.class_names, self.category_ids,
                                list(self.problems), self.source)


def read_rgb(path: str | Path, min_size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 via :func:`visionscale.io.images.read_image` (EXIF, odd modes); with
    ``min_size`` a large file is shrunk by a whole factor, still 8-bit, to no less than it."""
    from visionscale.io.images import read_image

    return read_image(path, min_size=min_size)


def image_size_of(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file header without decoding the pixels.

    Raises:
        OSError: The file is missing, not a regular file (a pipe would block), or not an image.
    """
    import stat
    import warnings

    from PIL import Image

    p = Path(path)
    try:
        if not stat.S_ISREG(p.stat().st_mode):
            raise OSError(f"{p} is not a regular file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(p) as img:
                return img.size
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - a NUL in the name, a bomb, a broken header...
        raise OSError(f"cannot read the size of {p}: {exc}") from None


class ImageCache:
    """Images resized to ``size x size`` as one uint8 tensor, boxes scaled alike.

    Images are stretched (not letterboxed): boxes scale by (size / width, size / height),
    and predictions are mapped back with the inverse factors for evaluation.
    """

    def __init__(self, dataset: DetectionDataset, size: int) -> None:
        from PIL import Image

        from visionscale.io.images import read_image_and_size

        self.dataset, self.size = dataset, size
        n = len(dataset)
        self.images = torch.empty((n, 3, size, size), dtype=torch.uint8)  # (N, 3, S, S)
        self.boxes: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.ignore: list[Tensor] = []
        self.scale = torch.empty((n, 2))  # (sx, sy) pixels of the original per resized pixel
        for i, rec in enumerate(dataset.records):
            # Shrunk while still 8-bit when the file is large: memory stays bounded by the
            # decoded file, not a full-size RGB copy (the size check uses the file's own size).
            arr, (h, w) = read_image_and_size(rec.path, min_size=(size, size))
            if (w, h) != (rec.width, rec.height):
                raise AnnotationError(f"{rec.path}: image is {w}x{h} but the annotations say {rec.width}x{rec.height}")
            if arr.shape[:2] != (size, size):
                arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR))
            self.images[i] = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
            sx, sy = size / w, size / h
            self.scale[i] = torch.tensor([1 / sx, 1 / sy])
            self.boxes.append(torch.from_numpy(rec.boxes).float() * torch.tensor([sx, sy, sx, sy]))
            self.labels.append(torch.from_numpy(rec.labels).long())
            self.ignore.append(torch.from_numpy(rec.ignore).bool())

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, indices: Tensor, flip: Tensor | None = None) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
        """Images (B, 3, S, S) float in [0, 1] and per-image boxes, labels, ignore flags.

        Args:
            indices: (B,) image indices.
            flip: (B,) bool; flip those images (and boxes) horizontally.
        """
        imgs = self.images[indices].float().div_(255)
        boxes = [self.boxes[i].clone() for i in indices.tolist()]
        if flip is not None and bool(flip.any()):
            imgs[flip] = imgs[flip].flip(-1)
            for j in torch.nonzero(flip).flatten().tolist():
                b = boxes[j]
                boxes[j] = torch.stack([self.size - b[:, 2], b[:, 1], self.size - b[:, 0], b[:, 3]], 1)
        return imgs, boxes, [self.labels[i] for i in indices.tolist()], [self.ignore[i] for i in indices.tolist()]


def to_coco_gt(dataset: DetectionDataset) -> dict:
    """The dataset as a COCO ground-truth dict (bbox xywh, area, iscrowd) for pycocotools."""
    images, anns = [], []
    next_id = 1
    for rec in dataset.records:
        images.append({"id": int(rec.image_id), "file_name": str(rec.path.name), "width": rec.width, "height": rec.height})
        for box, label, ign in zip(rec.boxes, rec.labels, rec.ignore):
            x1, y1, x2, y2 = (float(v) for v in box)
            anns.append({
                "id": next_id, "image_id": int(rec.image_id), "category_id": int(dataset.category_ids[int(label)]),
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": int(bool(ign)),
            })
            next_id += 1
    cats = [{"id": int(c), "name": n} for c, n in zip(dataset.category_ids, dataset.class_names)]
    return {"images": images, "annotations": anns, "categories": cats}
