"""Property tests of the annotation readers (COCO JSON, WIDER FACE text) on arbitrary input.

Whatever the file holds (wrong types, missing keys, NaN/inf/negative numbers, ids beyond int64,
unicode names), a reader returns a dataset whose boxes are all usable plus a list of what it
skipped, or raises AnnotationError naming the file; never KeyError, TypeError, OverflowError...
Inputs are tiny and written to one temporary file per example.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from visionscale.detection.coco import load_coco
from visionscale.detection.data import AnnotationError
from visionscale.detection.widerface import load_widerface

# Text that can be written as UTF-8 (no lone surrogates).
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
INTS = st.one_of(st.integers(-3, 6), st.integers(-(2**70), 2**70), st.sampled_from([2**63 - 1, 2**63, -(2**63) - 1]))
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(TEXT, inner, max_size=4)), max_leaves=12)


ODD_NUMBERS = st.sampled_from([math.nan, math.inf, -math.inf, -1, 0, -0.0, 0.5, 2**63, 2**70, 1e308, True])
ODD_VALUES = st.sampled_from([2**63, -(2**63) - 1, 2**70, "1", "", "ü\0", 1.0, None, [1], {}])
JUNK = st.one_of(ODD_NUMBERS, ODD_VALUES, JSON)
COORD = st.one_of(st.integers(-4, 70), st.floats(-4, 70), ODD_NUMBERS)
DELETE = object()


@st.composite
def coco_documents(draw):
    """A well-formed COCO document, then one to three faults: a field deleted or replaced by junk
    (a wrong type, NaN/inf, an id beyond int64...). Box coordinates are drawn with odd values
    too. Most documents so get past the structure checks to the boxes, unlike random JSON."""
    cats = [{"id": i, "name": draw(TEXT)} for i in range(1, draw(st.integers(1, 2)) + 1)]
    images = [{"id": i, "file_name": draw(st.one_of(st.just("a.png"), TEXT)), "width": draw(st.integers(8, 64)),
               "height": draw(st.integers(8, 64))} for i in range(1, draw(st.integers(1, 3)) + 1)]
    anns = [{"id": k, "image_id": draw(st.integers(1, len(images))), "category_id": draw(st.integers(1, len(cats))),
             "bbox": draw(st.lists(COORD, min_size=4, max_size=4)), "iscrowd": draw(st.sampled_from([0, 1]))}
            for k in range(1, draw(st.integers(0, 5)) + 1)]
    doc = {"images": images, "annotations": anns, "categories": cats}
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from(["images", "annotations", "categories", None]))
        value = draw(st.one_of(st.just(DELETE), JUNK))
        if section is None:  # the whole section
            target, key = doc, draw(st.sampled_from(["images", "annotations", "categories"]))
        elif not isinstance(doc.get(section), list) or not doc[section]:
            continue
        else:
            target = doc[section][draw(st.integers(0, len(doc[section]) - 1))]
            if not isinstance(target, dict):
                continue
            key = draw(st.sampled_from(sorted(target) or ["id"]))
        if value is DELETE:
            target.pop(key, None)
        else:
            target[key] = value
    return doc


def _check_dataset(ds, path) -> None:
    names = len(ds.class_names)
    assert len(ds.category_ids) == names
    for rec in ds.records:
        assert rec.width >= 1 and rec.height >= 1
        b = rec.boxes
        assert b.dtype == np.float32 and b.shape == (len(rec.labels), 4) and np.isfinite(b).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert (b[:, :2] >= 0).all() and (b[:, 2] <= rec.width).all() and (b[:, 3] <= rec.height).all()
        assert ((rec.labels >= 0) & (rec.labels < names)).all()
        assert len(rec.ignore) == len(rec.labels) == len(rec.ann_ids)
    assert all(isinstance(p, str) and str(path) in p for p in ds.problems)


@given(doc=coco_documents())
def test_coco_reader_on_faulty_documents(tmp_path, doc):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(doc), encoding="utf-8")  # NaN and Infinity as JSON's extension tokens
    try:
        ds = load_coco(path)
    except AnnotationError as exc:
        assert str(path) in str(exc)
        return
    _check_dataset(ds, path)
    # Every annotation became a box or a listed problem: nothing vanished silently.
    assert ds.num_boxes + len(ds.problems) == len(doc.get("annotations", []))
    if ds.problems:
        with pytest.raises(AnnotationError, match="ann.json"):
            load_coco(path, strict=True)
    else:
        assert load_coco(path, strict=True).num_boxes == ds.num_boxes


@given(doc=JSON)
def test_coco_reader_on_random_json(tmp_path, doc):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    try:
        ds = load_coco(path)
    except AnnotationError as exc:
        assert str(path) in str(exc)
        return
    _check_dataset(ds, path)


@given(data=st.binary(max_size=40))
def test_coco_reader_on_arbitrary_bytes(tmp_path, data):
    path = tmp_path / "ann.json"
    path.write_bytes(data)
    with pytest.raises(AnnotationError, match="ann.json"):
        load_coco(path)


def test_coco_reader_keeps_good_boxes_beside_each_kind_of_bad_one(tmp_path):
    doc = {"images": [{"id": 2**40, "file_name": "ünï 画.png", "width": 64, "height": 48}],
           "categories": [{"id": 2**62, "name": "face"}],
           "annotations": [
               {"id": 1, "image_id": 2**40, "category_id": 2**62, "bbox": [1, 2, 10, 5]},
               {"id": 2**64, "image_id": 2**40, "category_id": 2**62, "bbox": [1, 2, 10, 5]},  # id beyond int64
               {"id": 3, "image_id": 2**40, "category_id": 2**62, "bbox": [math.nan, 2, 10, 5]},
               {"id": 4, "image_id": 2**40, "category_id": 2**62, "bbox": [1, 2, math.inf, 5]},
               {"id": 5, "image_id": 2**40, "category_id": 2**62, "bbox": [1, 2, -3, 5]},
               {"id": 6, "image_id": 2**40, "category_id": 2**62, "bbox": [1, 2, 3, 4], "iscrowd": "yes"},
               {"id": 7, "image_id": "2", "category_id": 2**62, "bbox": [1, 2, 3, 4]},
               {"id": 8, "image_id": 2**40, "category_id": 2**63, "bbox": [1, 2, 3, 4]},
               {"id": 9, "image_id": 2**40, "category_id": 2**62, "bbox": [1e308, 2, 1e308, 4]},  # outside
           ]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    ds = load_coco(path)
    (rec,) = ds.records
    assert rec.image_id == 2**40 and rec.path.name == "ünï 画.png" and ds.category_ids == [2**62]
    assert rec.boxes.tolist() == [[1, 2, 11, 7]] * 2 and rec.ann_ids.tolist() == [1, -1]
    assert len(ds.problems) == 7
    for aid, what in ((3, "not finite"), (4, "not finite"), (5, "negative size"), (6, "iscrowd"),
                      (7, "unknown image_id '2'"), (8, "unknown category_id"), (9, "outside")):
        assert any(re.search(rf"annotation id {aid}\b", p) and what in p for p in ds.problems), (aid, ds.problems)
    for bad, field in (({"width": math.nan}, "width"), ({"width": 2**80}, "width"), ({"height": 0}, "height"),
                       ({"width": 10.5}, "width"), ({"id": "x"}, "id"), ({"file_name": ""}, "file_name"),
                       ({"file_name": "a\0b"}, "file_name")):
        broken = json.loads(json.dumps(doc))
        broken["images"][0].update(bad)
        path.write_text(json.dumps(broken), encoding="utf-8")
        with pytest.raises(AnnotationError, match=rf"ann\.json: images\[0\]: .*{field}"):
            load_coco(path)


# ---------------------------------------------------------------- WIDER FACE

NUMBER_TOKEN = st.one_of(st.integers(-5, 60).map(str), st.floats(-5, 60).map(repr),
                        st.sampled_from(["nan", "inf", "-inf", "1e400", "1e308", "-0", "0x10", "1_0"]))
JUNK_TOKEN = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Zl", "Zp", "Cc")), min_size=1, max_size=4)
NAME = st.one_of(st.sampled_from(["0--a/x.jpg", "b.jpg"]),
                 st.text(alphabet=st.characters(blacklist_categories=("Cs", "Zl", "Zp", "Cc")), max_size=8))


@st.composite
def wider_lines(draw):
    """Well-formed WIDER FACE blocks (name, face count, faces of ten numbers, some NaN/inf or
    negative), then up to two faults: a line replaced by junk, removed, or the file cut short."""
    lines = []
    for _ in range(draw(st.integers(1, 3))):
        faces = [" ".join(draw(st.lists(NUMBER_TOKEN, min_size=4, max_size=10))) for _ in range(draw(st.integers(0, 3)))]
        lines += [draw(NAME), str(len(faces))] + (faces or ["0 0 0 0 0 0 0 0 0 0"])
    for _ in range(draw(st.integers(0, 2))):
        i = draw(st.integers(0, len(lines) - 1))
        fault = draw(st.sampled_from(["junk", "drop", "cut", "count"]))
        if fault == "junk":
            lines[i] = " ".join(draw(st.lists(st.one_of(JUNK_TOKEN, NUMBER_TOKEN), max_size=5)))
        elif fault == "drop":
            del lines[i]
        elif fault == "cut":
            lines = lines[:i]
        else:
            lines[i] = str(draw(st.one_of(st.integers(-2, 5), st.integers(2**40, 2**70))))
        if not lines:
            break
    return lines


@given(lines=wider_lines())
def test_widerface_reader_on_faulty_files(tmp_path, lines):
    path = tmp_path / "wider_face_val_bbx_gt.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for read_sizes in (False, True):  # True: no image exists, every image is a listed problem
        try:
            ds = load_widerface(path, tmp_path / "images", read_sizes=read_sizes)
        except AnnotationError as exc:
            assert str(path) in str(exc)
            continue
        _check_dataset(ds, path)
        if read_sizes:
            assert len(ds) == 0


def test_widerface_reader_skips_faces_with_nan_or_inf(tmp_path):
    path = tmp_path / "gt.txt"
    path.write_text("a.jpg\n4\n1 1 5 5 0 0 0 0 0 0\nnan 1 5 5 0 0 0 0 0 0\n1 1 inf 5\n1e308 1 1e308 5\n")
    ds = load_widerface(path, tmp_path, read_sizes=False)
    assert ds.records[0].boxes.tolist() == [[1, 1, 6, 6]]
    assert len(ds.problems) == 3
    for k, p in enumerate(ds.problems, start=1):
        assert f"{path}:{k + 3}: image 'a.jpg' face {k}: box is not finite" in p
