"""Run bundles' predictors in a process where torch cannot be imported (tests/bundle).

Usage: python notorch_predict.py OUT.npz BUNDLE IMAGES [BUNDLE IMAGES ...] [--folder BUNDLE IMAGES OUT]
Writes, per bundle i, scores / labels / normalized scores / maps / region boxes into OUT.npz.
"""

import sys

sys.modules["torch"] = None  # `import torch` now raises ImportError, before anything else runs

import json  # noqa: E402

import numpy as np  # noqa: E402

import visionscale  # noqa: E402


def main(argv):
    import importlib

    try:
        importlib.import_module("torch")
    except ImportError:
        pass
    else:
        raise SystemExit("torch should not be importable here")
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
    loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in ("torch", "onnx"))
    print(json.dumps({"torch_modules": loaded}))


if __name__ == "__main__":
    main(sys.argv[1:])
