"""Dump dlib's HOG frontal face detector to ``src/visionscale/face/dlib_hog_frontal.npz``.

NEEDS dlib, OFFLINE ONLY (dlib is not a dependency of visionscale). dlib 20.0.1 was used::

    # 1. with dlib (any Python that has it): write dlib's own serialisation
    python -c "import dlib; dlib.get_frontal_face_detector().save('frontal.svm')"
    # 2. with visionscale (no dlib needed): parse it and write the .npz
    PYTHONPATH=src python tools/dump_dlib_hog.py --svm frontal.svm

Run with a Python that has dlib and no ``--svm``, it does step 1 itself (in a temp file).

The file is ``object_detector<scan_fhog_pyramid<pyramid_down<6>>>`` (dlib's
``image_processing/object_detector.h`` and ``scan_fhog_pyramid.h`` serialisers): the scanner's
configuration, the overlap tester, then one weight vector per filter (31 fHOG planes x the
window's cells, plus the threshold as its last element). The detector is part of dlib:
Boost Software License 1.0 (see ``src/visionscale/face/dlib_hog_frontal.LICENSE.txt``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from visionscale.io.dlib_dat import DatCursor  # noqa: E402

OUT = ROOT / "src" / "visionscale" / "face" / "dlib_hog_frontal.npz"


def parse(data: bytes, name: str) -> dict:
    cur = DatCursor(data, name)
    cur.expect_int(2, "object_detector version")
    cur.expect_int(1, "scan_fhog_pyramid version")
    # default_fhog_feature_extractor serialises nothing; then the (empty) cached feature
    # pyramid: dlib::array writes max_size and size.
    if cur.read_int("feats max_size") != 0 or cur.read_int("feats size") != 0:
        raise cur.error("expected an empty feature pyramid")
    cfg = {
        "cell_size": cur.read_int("cell_size"),
        "padding": cur.read_int("padding"),
        "window_width": cur.read_int("window_width"),
        "window_height": cur.read_int("window_height"),
        "max_pyramid_levels": cur.read_int("max_pyramid_levels"),
        "min_pyramid_layer_width": cur.read_int("min_pyramid_layer_width"),
        "min_pyramid_layer_height": cur.read_int("min_pyramid_layer_height"),
        "nuclear_norm_regularization_strength": cur.read_float("nuclear norm strength"),
    }
    dims = cur.read_int("num_dimensions")
    cfg["iou_thresh"] = cur.read_float("iou_thresh")
    cfg["percent_covered_thresh"] = cur.read_float("percent_covered_thresh")
    n = cur.read_int("num_detectors")
    weights = []
    for i in range(n):
        nr, nc = -cur.read_int(f"w[{i}] rows"), -cur.read_int(f"w[{i}] cols")
        if nc != 1 or nr != dims + 1:
            raise cur.error(f"w[{i}] is {nr}x{nc}, expected {dims + 1}x1")
        weights.append([cur.read_float(f"w[{i}][{j}]") for j in range(nr)])
    if not cur.at_end():
        raise cur.error(f"{cur.remaining} unexpected trailing bytes")
    return {"config": cfg, "num_dimensions": dims, "weights": np.asarray(weights, np.float64)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--svm", type=Path, help="dlib's saved detector (default: save it with dlib now)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    version = None
    if args.svm is None:
        import dlib  # offline only

        version = dlib.__version__
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "frontal.svm"
            dlib.get_frontal_face_detector().save(str(path))
            data = path.read_bytes()
        name = "dlib.get_frontal_face_detector()"
    else:
        data, name = args.svm.read_bytes(), str(args.svm)
    det = parse(data, name)
    meta = dict(det["config"], num_dimensions=det["num_dimensions"], source=name,
                dlib_version=version or "20.0.1 (from --svm)", licence="BSL-1.0 (dlib)")
    tmp = args.out.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, weights=det["weights"], meta=np.array(json.dumps(meta, sort_keys=True)))
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes): {len(det['weights'])} filters, {meta}")


if __name__ == "__main__":
    main()
