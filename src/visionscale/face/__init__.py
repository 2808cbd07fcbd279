"""Face detection (BlazeFace), alignment, embeddings, LFW verification and a persistent gallery.

``detect(image_or_images)`` finds faces with a shared default :class:`FaceDetector`
(MediaPipe's front/short-range BlazeFace weights); ``verify`` and ``Gallery`` come from the
recognition modules and are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from visionscale.face.detector import FaceDetection, FaceDetector

__all__ = ["detect", "FaceDetector", "FaceDetection", "align_face", "verify", "Gallery"]

_DEFAULT_DETECTORS: dict[tuple, Any] = {}


def _default_detector(**kw) -> FaceDetector:
    from visionscale.face.detector import FaceDetector

    key = tuple(sorted((k, str(v)) for k, v in kw.items()))
    if key not in _DEFAULT_DETECTORS:
        _DEFAULT_DETECTORS[key] = FaceDetector(**kw)
    return _DEFAULT_DETECTORS[key]


def detect(image_or_images, **kw):
    """Faces in one image (returns ``list[FaceDetection]``) or in a list of images
    (returns ``list[list[FaceDetection]]``); images are ``(H, W, 3)`` uint8 RGB arrays or paths.

    Keyword arguments build (and cache) the :class:`FaceDetector` used: ``model``, ``weights``,
    ``device``, ``min_score``, ``blending``.
    """
    import os

    import numpy as np

    from visionscale.io.images import read_image

    single = isinstance(image_or_images, (np.ndarray, str, os.PathLike))
    items = [image_or_images] if single else list(image_or_images)
    images = [read_image(x) if isinstance(x, (str, os.PathLike)) else x for x in items]
    results = _default_detector(**kw).detect(images)
    return results[0] if single else results


_LAZY = {
    "FaceDetector": "visionscale.face.detector",
    "FaceDetection": "visionscale.face.detector",
    "align_face": "visionscale.face.align",
    "verify": "visionscale.face.api",
    "Gallery": "visionscale.face.gallery",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'visionscale.face' has no attribute {name!r}")
