"""Run bundles' predictors in a process where torch cannot be imported (tests/bundle).

Usage: python notorch_predict.py OUT.npz BUNDLE IMAGES [BUNDLE IMAGES ...] [--folder BUNDLE IMAGES OUT]
Writes, per bundle i, scores / labels / normalized scores / maps / region boxes into OUT.npz.
"""

import _notorch  # first: `import torch` raises ImportError from here on

import json
import sys

import numpy as np

import visionscale


def main(argv):
    out = argv[0]
    rest = argv[1:]
    folder = None
    if "--folder" in rest:
        k = rest.index("--folder")
        folder, rest = rest[k + 1:k + 4], rest[:k]
    result = {}
    for i in range(0, len(rest), 2):
        pred = visionscale.load_bundle(rest[i])
        recs = pred.predict([rest[i + 1]])
        result[f"{i // 2}_paths"] = np.array([r["path"] for r in recs])
        result[f"{i // 2}_scores"] = np.array([r["score"] for r in recs], dtype=np.float64)
        result[f"{i // 2}_normalized"] = np.array([r["normalized_score"] for r in recs], dtype=np.float64)
        result[f"{i // 2}_labels"] = np.array([r["label"] for r in recs])
        result[f"{i // 2}_maps"] = np.stack([r["anomaly_map"] for r in recs])
        result[f"{i // 2}_regions"] = np.array([json.dumps([g["box"] for g in r["regions"]]) for r in recs])
        pred.close()
    if folder is not None:
        pred = visionscale.load_bundle(folder[0])
        pred.predict_folder([folder[1]], folder[2], raw_maps=True)
    np.savez(out, **result)
    print(json.dumps({"torch_modules": _notorch.loaded()}))


if __name__ == "__main__":
    main(sys.argv[1:])
