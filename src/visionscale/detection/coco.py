"""COCO JSON detection annotations -> :class:`DetectionDataset` (and back).

Format: Lin et al., "Microsoft COCO: Common Objects in Context", ECCV 2014; the fields used
are those of ``instances_*.json``: ``images`` (id, file_name, width, height),
``annotations`` (id, image_id, category_id, bbox = [x, y, w, h], iscrowd),
``categories`` (id, name). Boxes with zero or negative size, NaN or inf, and annotations of
unknown images or categories are skipped and reported with the file and the annotation id
(``strict=True`` raises instead).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from visionscale.detection.data import MAX_SIDE, AnnotationError, DetectionDataset, ImageRecord, image_size_of

__all__ = ["load_coco", "dump_coco"]


_INT64 = (-(2**63), 2**63 - 1)


def _show(value, limit: int = 60) -> str:
    """``repr`` of a value from the file, shortened: messages stay one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _int64(value) -> int | None:
    """``value`` if it is an integer (not a bool) that fits in int64, else None."""
    if isinstance(value, bool) or not isinstance(value, int) or not _INT64[0] <= value <= _INT64[1]:
        return None
    return value


def _num(value, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AnnotationError(f"{where}: {what} must be a number, got {_show(value)}")
    try:
        return float(value)
    except OverflowError:  # an integer beyond float range: as unusable as inf
        return math.inf


def _side(value, what: str, where: str) -> int:
    """An image width or height: a whole number of pixels in 1..MAX_SIDE."""
    v = _num(value, what, where)
    if not (math.isfinite(v) and v == int(v) and 1 <= v <= MAX_SIDE):
        raise AnnotationError(f"{where}: {what} must be a whole number of pixels in 1..{MAX_SIDE}, got {_show(value)}")
    return int(v)


def load_coco(ann_file: str | Path, images_dir: str | Path | None = None, strict: bool = False) -> DetectionDataset:
    """Read a COCO detection JSON.

    Any JSON gives either a dataset or :class:`AnnotationError` naming the file and the entry:
    a malformed structure (an image without an integer ``id`` or a ``file_name``, a ``bbox``
    that is not four numbers, duplicate ids) is an error; an annotation that is well-formed
    but unusable (unknown ``image_id`` or ``category_id``, a box with NaN/inf, zero or
    negative size or outside the image, ``iscrowd`` other than 0/1) is skipped and listed.

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
    except RecursionError:
        raise AnnotationError(f"{ann_file}: JSON nested too deeply to be a COCO file") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise AnnotationError(f"{ann_file}: not a COCO detection file (no 'images' list)")
    anns = data.get("annotations", [])
    cats = data.get("categories", [])
    if not isinstance(anns, list) or not isinstance(cats, list):
        raise AnnotationError(f"{ann_file}: 'annotations' and 'categories' must be lists")
    if not cats:
        raise AnnotationError(f"{ann_file}: no categories")

    cat_names: dict[int, str] = {}
    for k, c in enumerate(cats):
        cid = _int64(c.get("id")) if isinstance(c, dict) else None
        if cid is None:
            raise AnnotationError(f"{ann_file}: categories[{k}]: every category needs an integer 'id'")
        if cid in cat_names:
            raise AnnotationError(f"{ann_file}: categories[{k}]: duplicate category id {cid}")
        name = c.get("name", str(cid))
        if not isinstance(name, str):
            raise AnnotationError(f"{ann_file}: categories[{k}]: name must be a string, got {_show(name)}")
        cat_names[cid] = name
    cat_ids = sorted(cat_names)
    cat_index = {cid: i for i, cid in enumerate(cat_ids)}
    names = [cat_names[cid] for cid in cat_ids]

    problems: list[str] = []

    def skip(msg: str) -> None:
        if strict:
            raise AnnotationError(msg)
        problems.append(msg)

    images: dict[int, dict] = {}
    for k, img in enumerate(data["images"]):
        where = f"{ann_file}: images[{k}]"
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise AnnotationError(f"{where}: needs 'id' and 'file_name'")
        iid = _int64(img["id"])
        if iid is None:
            raise AnnotationError(f"{where}: id must be an integer, got {_show(img['id'])}")
        if iid in images:
            raise AnnotationError(f"{where}: duplicate image id {iid}")
        name = img["file_name"]
        if not isinstance(name, str) or not name or "\0" in name:
            raise AnnotationError(f"{where}: file_name must be a non-empty path, got {_show(name)}")
        path = images_dir / name
        if "width" in img and "height" in img:
            w, h = _side(img["width"], "width", where), _side(img["height"], "height", where)
        else:
            try:
                w, h = image_size_of(path)
            except OSError:
                raise AnnotationError(f"{where}: no width/height and cannot read {path}") from None
        images[iid] = {"path": path, "w": w, "h": h, "boxes": [], "labels": [], "ignore": [], "ids": []}

    for k, ann in enumerate(anns):
        if not isinstance(ann, dict):
            raise AnnotationError(f"{ann_file}: annotations[{k}] is not an object")
        aid = _int64(ann.get("id"))
        where = f"{ann_file}: annotation id {aid if aid is not None else f'#{k}'}"
        iid = _int64(ann.get("image_id"))
        if iid is None or iid not in images:
            skip(f"{where}: unknown image_id {_show(ann.get('image_id'))}")
            continue
        img = images[iid]
        where = f"{where} (image {iid} {_show(img['path'].name)})"
        cid = _int64(ann.get("category_id"))
        if cid is None or cid not in cat_index:
            skip(f"{where}: unknown category_id {_show(ann.get('category_id'))}")
            continue
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise AnnotationError(f"{where}: bbox must be [x, y, w, h], got {_show(bbox)}")
        x, y, w, h = (_num(v, "bbox value", where) for v in bbox)
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            skip(f"{where}: box is not finite (bbox [x, y, w, h] = {_show(list(bbox))})")
            continue
        if w <= 0 or h <= 0:
            skip(f"{where}: box has zero or negative size (bbox [x, y, w, h] = {_show(list(bbox))})")
            continue
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1):  # true and false compare equal to 1 and 0
            skip(f"{where}: iscrowd must be 0 or 1, got {_show(crowd)}")
            continue
        # clip to the image; a box entirely outside is as useless as an empty one
        W, H = img["w"], img["h"]  # noqa: N806
        box = np.array([min(max(x, 0.0), W), min(max(y, 0.0), H), min(max(x + w, 0.0), W), min(max(y + h, 0.0), H)],
                       dtype=np.float32)
        if box[2] <= box[0] or box[3] <= box[1]:  # in float32, as stored: a 1e-9 px box is empty too
            skip(f"{where}: box {_show(list(bbox))} lies outside the {img['w']}x{img['h']} image or is too thin")
            continue
        img["boxes"].append(box.tolist())
        img["labels"].append(cat_index[cid])
        img["ignore"].append(bool(crowd))
        img["ids"].append(aid if aid is not None else -1)

    records = [
        ImageRecord(
            image_id=iid, path=v["path"], width=v["w"], height=v["h"],
            boxes=np.asarray(v["boxes"], dtype=np.float32).reshape(-1, 4),
            labels=np.asarray(v["labels"], dtype=np.int64), ignore=np.asarray(v["ignore"], dtype=bool),
            ann_ids=np.asarray(v["ids"], dtype=np.int64),
        )
        for iid, v in images.items()
    ]
    return DetectionDataset(records, names, cat_ids, problems, str(ann_file))


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
