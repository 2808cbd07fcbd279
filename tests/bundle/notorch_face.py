"""Run a face bundle's predictor in a process where torch cannot be imported (tests/bundle).

Usage: python notorch_face.py OUT.npz GALLERY.db BUNDLE IMAGE [IMAGE ...]
Writes into OUT.npz, per image i: the faces' boxes, scores, keypoints, landmarks, usable flags and
embeddings; the verify answers of image 0 against every image with one face; and, after
enrolling image 0 as "eileen" into a new gallery (the gallery works with the bundle alone), who
every face of every image is. Prints the torch / onnx modules loaded (none expected).
"""

import _notorch  # first: `import torch` raises ImportError from here on

import json
import sys
import warnings

import numpy as np

import visionscale


def main(argv):
    out, gallery_path, bundle, images = argv[0], argv[1], argv[2], argv[3:]
    result = {}
    pred = visionscale.load_bundle(bundle, threads=1)
    for i, faces in enumerate(pred.embed_faces(images)):
        result[f"{i}_boxes"] = np.array([f.box for f in faces], dtype=np.float64).reshape(-1, 4)
        result[f"{i}_scores"] = np.array([f.score for f in faces], dtype=np.float64)
        result[f"{i}_keypoints"] = np.array([f.keypoints for f in faces], dtype=np.float64).reshape(-1, 6, 2)
        result[f"{i}_landmarks"] = np.array([f.landmarks for f in faces], dtype=np.int64).reshape(-1, 5, 2)
        result[f"{i}_usable"] = np.array([f.usable for f in faces], dtype=bool)
        result[f"{i}_dlib_boxes"] = np.array([f.dlib_box for f in faces], dtype=np.int64).reshape(-1, 4)
        result[f"{i}_box_sources"] = np.array(json.dumps([f.box_source for f in faces]))
        result[f"{i}_embeddings"] = np.array([f.embedding if f.usable else np.full(pred.dim, np.nan) for f in faces],
                                             dtype=np.float32).reshape(-1, pred.dim)
    detected = pred.detect(images)
    result["detect_counts"] = np.array([len(d) for d in detected])
    verified = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # several faces: the largest
        for i, path in enumerate(images):
            if result[f"{i}_usable"].any() and result[f"{i}_usable"][0]:
                v = pred.verify(images[0], path)
                verified.append([i, v.distance, float(v.same)])
    result["verify"] = np.array(verified, dtype=np.float64)
    from visionscale.face.gallery import Gallery

    with Gallery(gallery_path, embedder=pred) as g:
        g.enroll("eileen", images=[images[0]])
    with Gallery(gallery_path, embedder=pred, read_only=True) as g:
        names = [[ident.name for ident in row] for row in pred.identify(g, images)]
    result["identify"] = np.array(json.dumps(names))
    result["model_id"] = np.array(pred.model_id)
    pred.close()
    np.savez(out, **result)
    print(json.dumps({"torch_modules": _notorch.loaded()}))


if __name__ == "__main__":
    main(sys.argv[1:])
