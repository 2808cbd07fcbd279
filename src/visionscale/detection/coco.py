"""COCO JSON detection annotations -> :class:`DetectionDataset` (and back).

Format: Lin et al., "Microsoft COCO: Common Objects in Context", ECCV 2014; the fields used
are those of ``instances_*.json``: ``images`` (id, file_name, width, height),
``annotations`` (id, image_id, category_id, bbox = [x, y, w, h], iscrowd),
``categories`` (id, name). Boxes with zero or negative size are skipped and reported with
the file and the annotation id (``strict=True`` raises instead).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from visionscale.detection.data import AnnotationError, DetectionDataset, ImageRecord, image_size_of

__all__ = ["load_coco", "dump_coco"]


def _num(value, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AnnotationError(f"{where}: {what} must be a number, got {value!r}")
    return float(value)


def load_coco(ann_file: str | Path, images_dir: str | Path | None = None, strict: bool = False) -> DetectionDataset:
    """Read a COCO detection JSON.

    Args:
        ann_file: The JSON file.
        images_dir: Folder that ``file_name`` is relative to (default: the JSON's folder).
        strict: Raise :class:`AnnotationError` on the first bad box instead of skipping it.

    Returns:
        The dataset; ``problems`` lists every skipped entry as ``"FILE: annotation id N
        (image M 'name'): ..."``.
    """
    ann_file = Path(ann_file)
    images_dir = Path(images_dir) if images_dir is not None else ann_file.parent
    try:
        data = json.loads(ann_file.read_text())
    except FileNotFoundError:
        raise AnnotationError(f"annotation file not found: {ann_file}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnnotationError(f"{ann_file}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise AnnotationError(f"{ann_file}: not a COCO detection file (no 'images' list)")
    anns = data.get("annotations", [])
    cats = data.get("categories", [])
    if not isinstance(anns, list) or not isinstance(cats, list):
        raise AnnotationError(f"{ann_file}: 'annotations' and 'categories' must be lists")
    if not cats:
        raise AnnotationError(f"{ann_file}: no categories")

    try:
        cats = sorted(cats, key=lambda c: int(c["id"]))
        cat_index = {int(c["id"]): i for i, c in enumerate(cats)}
        names = [str(c.get("name", c["id"])) for c in cats]
    except (KeyError, TypeError, ValueError):
        raise AnnotationError(f"{ann_file}: every category needs an integer 'id'") from None

    problems: list[str] = []
    images: dict[int, dict] = {}
    for k, img in enumerate(data["images"]):
        where = f"{ann_file}: images[{k}]"
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise AnnotationError(f"{where}: needs 'id' and 'file_name'")
        iid = int(img["id"])
        if iid in images:
            raise AnnotationError(f"{where}: duplicate image id {iid}")
        path = images_dir / str(img["file_name"])
        if "width" in img and "height" in img:
            w, h = int(_num(img["width"], "width", where)), int(_num(img["height"], "height", where))
        else:
            try:
                w, h = image_size_of(path)
            except OSError:
                raise AnnotationError(f"{where}: no width/height and cannot read {path}") from None
        if w <= 0 or h <= 0:
            raise AnnotationError(f"{where}: image {iid} has size {w}x{h}")
        images[iid] = {"path": path, "w": w, "h": h, "boxes": [], "labels": [], "ignore": [], "ids": []}

    for k, ann in enumerate(anns):
        if not isinstance(ann, dict):
            raise AnnotationError(f"{ann_file}: annotations[{k}] is not an object")
        aid = ann.get("id", f"#{k}")
        where = f"{ann_file}: annotation id {aid}"
        iid = ann.get("image_id")
        if not isinstance(iid, int) or iid not in images:
            msg = f"{where}: unknown image_id {iid!r}"
            if strict:
                raise AnnotationError(msg)
            problems.append(msg)
            continue
        img = images[iid]
        where = f"{where} (image {iid} '{img['path'].name}')"
        cid = ann.get("category_id")
        if not isinstance(cid, int) or cid not in cat_index:
            msg = f"{where}: unknown category_id {cid!r}"
            if strict:
                raise AnnotationError(msg)
            problems.append(msg)
            continue
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise AnnotationError(f"{where}: bbox must be [x, y, w, h], got {bbox!r}")
        x, y, w, h = (_num(v, "bbox value", where) for v in bbox)
        if not all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0:
            msg = f"{where}: box has zero or negative size (bbox [x, y, w, h] = {list(bbox)})"
            if strict:
                raise AnnotationError(msg)
            problems.append(msg)
            continue
        # clip to the image; a box entirely outside is as useless as an empty one
        x1, y1 = max(x, 0.0), max(y, 0.0)
        x2, y2 = min(x + w, img["w"]), min(y + h, img["h"])
        if x2 <= x1 or y2 <= y1:
            msg = f"{where}: box {list(bbox)} lies outside the {img['w']}x{img['h']} image"
            if strict:
                raise AnnotationError(msg)
            problems.append(msg)
            continue
        img["boxes"].append([x1, y1, x2, y2])
        img["labels"].append(cat_index[cid])
        img["ignore"].append(bool(ann.get("iscrowd", 0)))
        img["ids"].append(int(aid) if isinstance(aid, int) else -1)

    records = [
        ImageRecord(
            image_id=iid, path=v["path"], width=v["w"], height=v["h"],
            boxes=np.asarray(v["boxes"], dtype=np.float32).reshape(-1, 4),
            labels=np.asarray(v["labels"], dtype=np.int64), ignore=np.asarray(v["ignore"], dtype=bool),
            ann_ids=np.asarray(v["ids"], dtype=np.int64),
        )
        for iid, v in images.items()
    ]
    return DetectionDataset(records, names, [int(c["id"]) for c in cats], problems, str(ann_file))


def dump_coco(dataset: DetectionDataset, images_dir: str | Path | None = None) -> dict:
    """The dataset as a COCO JSON dict; ``file_name`` relative to ``images_dir`` if given."""
    out = {"images": [], "annotations": [], "categories": []}
    out["categories"] = [{"id": int(c), "name": n} for c, n in zip(dataset.category_ids, dataset.class_names)]
    next_id = 1
    for rec in dataset.records:
        name = str(rec.path.relative_to(images_dir)) if images_dir is not None else rec.path.name
        out["images"].append({"id": int(rec.image_id), "file_name": name, "width": rec.width, "height": rec.height})
        for box, label, ign in zip(rec.boxes, rec.labels, rec.ignore):
            x1, y1, x2, y2 = (round(float(v), 2) for v in box)
            out["annotations"].append({
                "id": next_id, "image_id": int(rec.image_id), "category_id": int(dataset.category_ids[int(label)]),
                "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)], "area": round((x2 - x1) * (y2 - y1), 2),
                "iscrowd": int(bool(ign)),
            })
            next_id += 1
    return out
