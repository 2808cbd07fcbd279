"""WIDER FACE box annotations (``wider_face_{train,val}_bbx_gt.txt``) -> :class:`DetectionDataset`.

Format (Yang et al., "WIDER FACE: A Face Detection Benchmark", CVPR 2016; the readme of
``wider_face_split.zip``), repeated per image::

    0--Parade/0_Parade_marchingband_1_849.jpg      image path, relative to WIDER_*/images
    1                                               number of faces
    449 330 122 149 0 0 0 0 0 0                     x1 y1 w h blur expression illumination invalid occlusion pose

An image with no face has the count 0 followed by one all-zero line. Faces flagged
``invalid`` become ignore regions. Faces with zero or negative size (the train split has
some) or NaN/inf values are skipped and reported with the file, its line number and the
face's index.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from visionscale.detection.data import MAX_SIDE, AnnotationError, DetectionDataset, ImageRecord, image_size_of

__all__ = ["load_widerface"]


def load_widerface(gt_file: str | Path, images_dir: str | Path, strict: bool = False,
                   read_sizes: bool = True) -> DetectionDataset:
    """Read a WIDER FACE ground-truth text file.

    Args:
        gt_file: ``wider_face_train_bbx_gt.txt`` or ``wider_face_val_bbx_gt.txt``.
        images_dir: ``WIDER_train/images`` (paths in the file are relative to it).
        strict: Raise :class:`AnnotationError` on the first bad face instead of skipping it.
        read_sizes: Read each image's size from its header (WIDER's text has none). If
            False, the size is taken as the extent of the boxes (for parsing tests only).

    Returns:
        One class, ``"face"`` (category id 1); image ids count from 1 in file order.
    """
    gt_file, images_dir = Path(gt_file), Path(images_dir)
    try:
        lines = gt_file.read_text().splitlines()
    except FileNotFoundError:
        raise AnnotationError(f"annotation file not found: {gt_file}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{gt_file}: cannot read ({exc})") from None

    problems: list[str] = []
    records: list[ImageRecord] = []
    i = 0
    n_lines = len(lines)
    while i < n_lines:
        name = lines[i].strip()
        if not name:
            i += 1
            continue
        name_line = i + 1  # 1-based for messages
        if i + 1 >= n_lines:
            raise AnnotationError(f"{gt_file}:{name_line}: image '{name}' has no face count")
        try:
            count = int(lines[i + 1].split()[0])
        except (ValueError, IndexError):
            raise AnnotationError(f"{gt_file}:{i + 2}: expected the number of faces of '{name}', "
                                  f"got {lines[i + 1]!r}") from None
        if count < 0:
            raise AnnotationError(f"{gt_file}:{i + 2}: negative face count {count} for '{name}'")
        i += 2
        rows = max(count, 1)  # a face-less image still has one all-zero line
        if i + rows > n_lines:
            raise AnnotationError(f"{gt_file}:{name_line}: '{name}' announces {count} faces but the file ends")
        boxes, ignore, ids = [], [], []
        for k in range(count):
            line_no = i + k + 1
            parts = lines[i + k].split()
            try:
                vals = [float(v) for v in parts]
            except ValueError:
                raise AnnotationError(f"{gt_file}:{line_no}: '{name}' face {k}: not numbers: {lines[i + k]!r}") from None
            if len(vals) < 4:
                raise AnnotationError(f"{gt_file}:{line_no}: '{name}' face {k}: need at least x1 y1 w h")
            x, y, w, h = vals[:4]
            if not all(math.isfinite(v) for v in (x, y, w, h, x + w, y + h)):
                msg = (f"{gt_file}:{line_no}: image '{name}' face {k}: box is not finite "
                       f"(x1={x:g}, y1={y:g}, w={w:g}, h={h:g})")
                if strict:
                    raise AnnotationError(msg)
                problems.append(msg)
                continue
            if w <= 0 or h <= 0:
                msg = (f"{gt_file}:{line_no}: image '{name}' face {k}: box has zero or negative size "
                       f"(x1={x:g}, y1={y:g}, w={w:g}, h={h:g})")
                if strict:
                    raise AnnotationError(msg)
                problems.append(msg)
                continue
            boxes.append([x, y, x + w, y + h])
            ignore.append(len(vals) > 7 and vals[7] != 0)  # the 'invalid' flag
            ids.append(k)
        i += rows

        path = images_dir / name
        if read_sizes:
            try:
                width, height = image_size_of(path)
            except OSError:
                msg = f"{gt_file}:{name_line}: image '{name}' cannot be read from {images_dir}"
                if strict:
                    raise AnnotationError(msg) from None
                problems.append(msg)
                continue
        else:
            ext = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
            width = int(np.clip(np.ceil(ext[:, 2].max()), 1, MAX_SIDE)) if len(ext) else 1
            height = int(np.clip(np.ceil(ext[:, 3].max()), 1, MAX_SIDE)) if len(ext) else 1
        arr = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        arr[:, [0, 2]] = arr[:, [0, 2]].clip(0, width)
        arr[:, [1, 3]] = arr[:, [1, 3]].clip(0, height)
        keep = (arr[:, 2] > arr[:, 0]) & (arr[:, 3] > arr[:, 1])
        for k in np.nonzero(~keep)[0]:
            msg = f"{gt_file}:{name_line}: image '{name}' face {ids[k]}: box lies outside the {width}x{height} image"
            if strict:
                raise AnnotationError(msg)
            problems.append(msg)
        records.append(ImageRecord(
            image_id=len(records) + 1, path=path, width=width, height=height, boxes=arr[keep],
            labels=np.zeros(int(keep.sum()), dtype=np.int64), ignore=np.asarray(ignore, dtype=bool)[keep],
            ann_ids=np.asarray(ids, dtype=np.int64)[keep],
        ))
    return DetectionDataset(records, ["face"], [1], problems, str(gt_file))
