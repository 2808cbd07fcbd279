"""Reference outputs of dlib's HOG face detector (and its recognition pipeline) for our tests
and benchmarks.

NEEDS dlib, OFFLINE ONLY (dlib 20.0.1 was used; it is not a dependency of visionscale). Run
with a Python that has dlib, numpy and Pillow, from the repository root:

    # tests/face/data/dlib/hog_boxes.json: dlib's boxes, scores and filter indices on the
    # astronaut variants of tests/hog_variants.py
    python tools/make_dlib_hog_reference.py tests

    # benchmarks/data/dlib_hog_heldout.json: dlib's whole pipeline (HOG boxes, upsample 1;
    # 5-point landmarks; descriptors, no jitter) on held-out astronaut variants
    # (tests/hog_variants.heldout(); benchmarks/bench_dlib_hog.py makes the same arrays)
    python tools/make_dlib_hog_reference.py heldout

    # the same for any image files (e.g. photos you may not redistribute; keep the output local)
    python tools/make_dlib_hog_reference.py images --glob "photos/*.png" --out /tmp/ref.json

The pipeline modes need face_recognition_models' shape_predictor_5_face_landmarks.dat and
dlib_face_recognition_resnet_model_v1.dat (``--models`` folder, default: found via
``face_recognition_models`` if importable).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _write(path: Path, obj, compact: bool = False) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text((json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj, indent=1)) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")


def _run(det, img, upsample, adjust):
    rects, scores, idx = det.run(img, upsample, adjust)
    return [[r.left(), r.top(), r.right(), r.bottom(), float(s), int(k)] for r, s, k in zip(rects, scores, idx)]


def tests_mode() -> None:
    import dlib

    import hog_variants as hv

    det = dlib.get_frontal_face_detector()
    out = {"dlib_version": dlib.__version__, "call": "detector.run(image, upsample, adjust_threshold)",
           "variants": {}}
    for name, runs in hv.VARIANTS.items():
        img = hv.make(name)
        out["variants"][name] = {"shape": list(img.shape), "runs": [
            {"upsample": u, "adjust_threshold": a, "dets": _run(det, img, u, a)} for u, a in runs]}
    _write(ROOT / "tests" / "face" / "data" / "dlib" / "hog_boxes.json", out)


def _models(folder: str | None):
    import dlib

    if folder is None:
        import importlib.util

        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None or not spec.submodule_search_locations:
            sys.exit("--models not given and face_recognition_models not importable")
        folder = os.path.join(list(spec.submodule_search_locations)[0], "models")
    sp = dlib.shape_predictor(os.path.join(folder, "shape_predictor_5_face_landmarks.dat"))
    fr = dlib.face_recognition_model_v1(os.path.join(folder, "dlib_face_recognition_resnet_model_v1.dat"))
    return sp, fr


def _pipeline(images: dict, models: str | None) -> dict:
    import dlib

    det = dlib.get_frontal_face_detector()
    sp, fr = _models(models)
    out = {}
    for name, img in images.items():
        faces = []
        for l, t, r, b, score, k in _run(det, img, 1, 0.0):
            shape = sp(img, dlib.rectangle(l, t, r, b))
            desc = np.asarray(fr.compute_face_descriptor(img, shape, 1))
            faces.append({"rect": [l, t, r, b], "score": score, "filter": k,
                          "landmarks5": [[p.x, p.y] for p in shape.parts()],
                          "descriptor": [round(float(v), 7) for v in desc]})
        out[name] = {"shape": list(img.shape), "faces": faces}
    return {"dlib_version": dlib.__version__, "upsample": 1,
            "call": "detector.run(img, 1, 0); shape_predictor_5; compute_face_descriptor(img, shape, 1)",
            "images": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["tests", "heldout", "images"])
    ap.add_argument("--glob", help="images mode: the files")
    ap.add_argument("--out", type=Path, help="images mode: the JSON to write")
    ap.add_argument("--models", help="folder with the two .dat files")
    args = ap.parse_args()
    if args.mode == "tests":
        tests_mode()
    elif args.mode == "heldout":
        import hog_variants as hv

        ref = _pipeline(hv.heldout(), args.models)
        (ROOT / "benchmarks" / "data").mkdir(exist_ok=True)
        _write(ROOT / "benchmarks" / "data" / "dlib_hog_heldout.json", ref, compact=True)
    else:
        from PIL import Image

        if not args.glob or not args.out:
            sys.exit("images mode needs --glob and --out")
        images = {os.path.basename(f): np.asarray(Image.open(f).convert("RGB")) for f in sorted(glob.glob(args.glob))}
        ref = _pipeline(images, args.models)
        ref["glob"] = args.glob
        _write(args.out, ref, compact=True)


if __name__ == "__main__":
    main()
