"""How exactly the face pipeline frames faces like dlib, before and after the HOG snap, and what
the snap costs (CPU).

Usage: python benchmarks/bench_dlib_hog.py [--set NAME=REFERENCE.json[:GLOB]] [--full-scans 6] [--write]
       (--write updates docs/benchmarks.md between the bench_dlib_hog markers)

For every face dlib 20.0.1's own pipeline found (a reference JSON written offline by
``tools/make_dlib_hog_reference.py``: HOG boxes with upsample 1, 5-point landmarks, descriptors),
the BlazeFace detection it belongs to (the one whose calibrated box overlaps dlib's box most,
IoU >= 0.3) goes through our pipeline twice: with the calibrated box (``dlib_rect``, before)
and with the box snapped to our port of dlib's HOG detector (``hog_rect``, after; falling back to
the calibrated box where it finds nothing). Reported: how often the box equals dlib's, the
distance of our descriptor to dlib's (median / 90th percentile / max), where the boxes came
from, and the HOG step's time per face; and, on the first ``--full-scans`` images of a set, the
time of a full-image scan (``HogFaceDetector()(image, 1)``) and whether it equals dlib's boxes.

Sets: ``heldout`` (default): the whole astronaut (public domain) at 4 scales x 5 rotations x
2 flips (``tests/hog_variants.heldout()``; reference in ``benchmarks/data/``); more with
``--set name=ref.json:glob`` (image files, e.g. photos you may not redistribute; keep their
reference local).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from benchlib import machine, update_section  # noqa: E402

import hog_variants as hv  # noqa: E402
from visionscale.face.dlib_align import dlib_rect  # noqa: E402
from visionscale.face.dlib_hog import default_hog_detector  # noqa: E402

SECTION, TITLE = "bench_dlib_hog", "dlib's HOG box snap in the face pipeline (`benchmarks/bench_dlib_hog.py`)"
HELDOUT = ROOT / "benchmarks" / "data" / "dlib_hog_heldout.json"


def iou(a, b) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def load_set(spec: str):
    """``name=ref.json[:glob]`` -> (name, reference, {image name: array})."""
    name, rest = spec.split("=", 1)
    ref_path, _, pattern = rest.partition(":")
    ref = json.loads(Path(ref_path).read_text())
    if pattern:
        from PIL import Image

        images = {os.path.basename(f): np.asarray(Image.open(f).convert("RGB")) for f in sorted(glob.glob(pattern))}
    else:
        images = hv.heldout()
    missing = set(ref["images"]) - set(images)
    if missing:
        sys.exit(f"{name}: {len(missing)} reference images not found, e.g. {sorted(missing)[:3]}")
    return name, ref, images


def pct(v, q):
    return float(np.percentile(v, q)) if len(v) else float("nan")


def run_set(name, ref, images, recognizer, full_scans: int) -> dict:
    aligner, embedder = recognizer.aligner, recognizer.embedder
    det = default_hog_detector()
    rows, unmatched_sources, missed = [], {"hog": 0, "calibrated": 0}, 0
    for img_name, entry in ref["images"].items():
        img = images[img_name]
        found = recognizer.detector.detect([img])[0]
        cal_rects = [dlib_rect(d.keypoints) for d in found]
        used = set()
        for face in entry["faces"]:
            scores = [iou(face["rect"], r) for r in cal_rects]
            j = int(np.argmax(scores)) if scores else -1
            if j < 0 or scores[j] < 0.3:
                missed += 1
                continue
            used.add(j)
            kp = found[j].keypoints
            t = time.perf_counter()
            rect_h, source = aligner.face_rect(img, kp)
            dt = time.perf_counter() - t
            al_c, al_h = aligner.from_rect(img, cal_rects[j]), aligner.from_rect(img, rect_h)
            d_c, d_h = embedder.embed([al_c.chip, al_h.chip])
            want = np.asarray(face["descriptor"])
            rows.append({"image": img_name, "dlib": face["rect"], "cal": [int(v) for v in cal_rects[j]],
                         "hog": [int(v) for v in rect_h], "source": source, "ms": dt * 1000,
                         "dist_cal": float(np.linalg.norm(d_c - want)), "dist_hog": float(np.linalg.norm(d_h - want)),
                         "width": face["rect"][2] - face["rect"][0] + 1})
        for j, d in enumerate(found):
            if j not in used:
                unmatched_sources[aligner.face_rect(img, d.keypoints)[1]] += 1
    scans = []
    for img_name in list(ref["images"])[:full_scans]:
        img = images[img_name]
        t = time.perf_counter()
        got = det(img, 1)
        dt = time.perf_counter() - t
        same = [list(g.rect) for g in got] == [f["rect"] for f in ref["images"][img_name]["faces"]]
        scans.append({"image": img_name, "shape": list(img.shape[:2]), "ms": dt * 1000, "same": same})
    return {"name": name, "images": len(ref["images"]), "dlib_faces": sum(len(e["faces"]) for e in ref["images"].values()),
            "missed_by_blazeface": missed, "rows": rows, "unmatched_sources": unmatched_sources, "scans": scans}


def report(results: list[dict], command: str) -> str:
    lines = [f"CPU only: {machine()}. Command: `{command}`. Other jobs were running on this 2-core "
             "machine, so times are indicative. Reference: dlib 20.0.1's own pipeline (HOG detector, "
             "upsample 1; 5-point landmarks; descriptor without jitter), written offline by "
             "`tools/make_dlib_hog_reference.py`.", "",
             "| set | images | dlib's faces | matched to a BlazeFace face | box = dlib's, calibrated -> HOG snap "
             "| descriptor distance to dlib's, calibrated: median / p90 / max | after the snap: median / p90 / max "
             "| snapped boxes (`box_source`) | HOG step per face, ms: median / p90 |",
             "|---|---:|---:|---:|---|---|---|---|---|"]
    for r in results:
        rows = r["rows"]
        dc = [x["dist_cal"] for x in rows]
        dh = [x["dist_hog"] for x in rows]
        eq_c = sum(x["cal"] == x["dlib"] for x in rows)
        eq_h = sum(x["hog"] == x["dlib"] for x in rows)
        hog_n = sum(x["source"] == "hog" for x in rows)
        ms = [x["ms"] for x in rows]
        lines.append(f"| {r['name']} | {r['images']} | {r['dlib_faces']} | {len(rows)} | {eq_c} -> **{eq_h}** of {len(rows)} "
                     f"| {np.median(dc):.3f} / {pct(dc, 90):.3f} / {max(dc):.3f} "
                     f"| **{np.median(dh):.4f} / {pct(dh, 90):.4f} / {max(dh):.4f}** "
                     f"| {hog_n} hog, {len(rows) - hog_n} calibrated | {np.median(ms):.0f} / {pct(ms, 90):.0f} |")
    lines.append("")
    for r in results:
        u = r["unmatched_sources"]
        bad = [x for x in r["rows"] if x["hog"] != x["dlib"]]
        lines.append(f"- **{r['name']}**: {r['missed_by_blazeface']} of dlib's boxes have no BlazeFace face "
                     "(not compared); of BlazeFace's faces without a dlib box, "
                     f"{u['calibrated']} kept the calibrated box and {u['hog']} snapped to a HOG box." + (" Boxes that still differ from dlib's: " + "; ".join(
                         f"{x['image']} (dlib {x['dlib']}, ours {x['hog']} from {x['source']}, distance "
                         f"{x['dist_hog']:.3f})" for x in bad[:6]) + ("; ..." if len(bad) > 6 else "") if bad else ""))
        if r["scans"]:
            s = r["scans"]
            lines.append(f"  Full-image scan (`HogFaceDetector()(image, 1)`, all levels) on {len(s)} of its images "
                         f"({s[0]['shape'][1]}x{s[0]['shape'][0]} px first): median "
                         f"{np.median([x['ms'] for x in s]):.0f} ms per image; boxes equal to dlib's on "
                         f"{sum(x['same'] for x in s)} of {len(s)}.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", action="append", default=[], help="name=reference.json[:glob] (repeatable)")
    ap.add_argument("--no-heldout", action="store_true", help="skip the committed astronaut set")
    ap.add_argument("--full-scans", type=int, default=6)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the per-face rows here")
    args = ap.parse_args()
    from visionscale.face.api import FaceRecognizer
    from visionscale.face.detector import FaceDetector

    recognizer = FaceRecognizer(detector=FaceDetector(model="front"))
    specs = ([] if args.no_heldout else [f"astronaut held-out={HELDOUT}"]) + args.set
    results = []
    for spec in specs:
        name, ref, images = load_set(spec)
        results.append(run_set(name, ref, images, recognizer, args.full_scans))
        print(f"{name}: {len(results[-1]['rows'])} faces", flush=True)
    command = "python benchmarks/bench_dlib_hog.py " + " ".join(sys.argv[1:])
    text = report(results, command)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.write:
        print(f"updated {update_section(SECTION, TITLE, text)}")


if __name__ == "__main__":
    main()
