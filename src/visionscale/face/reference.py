"""Reference implementations our BlazeFace port is checked against (optional packages).

* :func:`litert_raw`: MediaPipe's ``.tflite`` run by the TFLite interpreter (``ai-edge-litert``).
* :class:`MediaPipeFaceDetector`: MediaPipe's own face detector (``mediapipe`` tasks API).
  The tasks API refuses a model without TFLite metadata (it reads the input normalisation from
  it) and the released BlazeFace files carry none, so :func:`with_image_metadata` adds the
  minimal metadata MediaPipe's own model files have: an RGB image input normalised with mean
  127.5 and std 127.5 (i.e. [-1, 1]). The graph then configures everything else itself
  (anchors, decoding, weighted NMS: ``FaceDetectorGraph``); it supports the 128 px front model.

Used by the parity tests and ``benchmarks/bench_blazeface.py``; nothing in the detector imports it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["litert_raw", "LiteRTRunner", "with_image_metadata", "MediaPipeFaceDetector"]


class LiteRTRunner:
    """A ``.tflite`` model in the TFLite interpreter: NHWC float32 batch -> (regressors, classificators)."""

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.path = str(path)
        self.interpreter = Interpreter(model_path=self.path, num_threads=num_threads)
        self._batch = None

    def __call__(self, x_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # MediaPipe's graphs reshape to fixed [1, N, C] shapes, so the batch runs one image at a time.
        it = self.interpreter
        if self._batch is None:
            it.allocate_tensors()
            self._batch = 1
        inp = it.get_input_details()[0]["index"]
        outs = {d["name"]: d["index"] for d in it.get_output_details()}
        regs, clss = [], []
        for x in np.ascontiguousarray(x_nhwc, dtype=np.float32):
            it.set_tensor(inp, x[None])
            it.invoke()
            regs.append(it.get_tensor(outs["regressors"])[0])
            clss.append(it.get_tensor(outs["classificators"])[0])
        return np.stack(regs), np.stack(clss)


def litert_raw(path: str | os.PathLike, x_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-off run of a BlazeFace ``.tflite`` on an NHWC float batch in [-1, 1]."""
    return LiteRTRunner(path)(x_nhwc)


def with_image_metadata(model_bytes: bytes, mean: float = 127.5, std: float = 127.5) -> bytes:
    """A copy of a ``.tflite`` model with TFLite metadata describing an RGB image input.

    Uses the FlatBuffer schemas bundled with ``mediapipe`` (``mediapipe.tasks.metadata``).
    """
    import flatbuffers
    from mediapipe.tasks.metadata import metadata_schema_py_generated as md
    from mediapipe.tasks.metadata import schema_py_generated as tfl

    model = tfl.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    props = md.ImagePropertiesT()
    props.colorSpace = md.ColorSpaceType.RGB
    image_md = md.TensorMetadataT(
        name="image",
        content=md.ContentT(contentPropertiesType=md.ContentProperties.ImageProperties, contentProperties=props),
        processUnits=[md.ProcessUnitT(optionsType=md.ProcessUnitOptions.NormalizationOptions,
                                      options=md.NormalizationOptionsT(mean=[mean], std=[std]))],
    )
    subgraph = md.SubGraphMetadataT(inputTensorMetadata=[image_md],
                                    outputTensorMetadata=[md.TensorMetadataT(name="regressors"),
                                                          md.TensorMetadataT(name="classificators")])
    meta = md.ModelMetadataT(name="BlazeFace", subgraphMetadata=[subgraph], minParserVersion="1.0.0")
    b = flatbuffers.Builder(1024)
    b.Finish(meta.Pack(b), file_identifier=b"M001")
    buffer = tfl.BufferT()
    buffer.data = np.frombuffer(bytes(b.Output()), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = tfl.MetadataT()
    entry.name = "TFLITE_METADATA"
    entry.buffer = len(model.buffers) - 1
    model.metadata = (model.metadata or []) + [entry]
    b2 = flatbuffers.Builder(len(model_bytes) + 4096)
    b2.Finish(model.Pack(b2), file_identifier=b"TFL3")
    return bytes(b2.Output())


class MediaPipeFaceDetector:
    """MediaPipe's face detector (tasks API) on a BlazeFace front ``.tflite``; boxes in pixels.

    ``detect(image)`` -> list of ``(box xyxy, score, keypoints (6, 2))`` in image pixels, like
    :class:`visionscale.face.detector.FaceDetection`. MediaPipe returns integer box pixels.
    """

    def __init__(self, tflite_path: str | os.PathLike, min_score: float = 0.5) -> None:
        import mediapipe as mp
        from mediapipe.tasks.python import BaseOptions, vision

        self._mp = mp
        data = with_image_metadata(Path(tflite_path).read_bytes())
        opts = vision.FaceDetectorOptions(base_options=BaseOptions(model_asset_buffer=data),
                                          min_detection_confidence=min_score)
        self._det = vision.FaceDetector.create_from_options(opts)

    def detect(self, image: np.ndarray) -> list[tuple[tuple[float, float, float, float], float, np.ndarray]]:
        mp = self._mp
        h, w = image.shape[:2]
        res = self._det.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(image)))
        out = []
        for d in res.detections:
            bb = d.bounding_box
            box = (float(bb.origin_x), float(bb.origin_y), float(bb.origin_x + bb.width), float(bb.origin_y + bb.height))
            kps = np.array([[k.x * w, k.y * h] for k in d.keypoints], dtype=np.float32)
            out.append((box, float(d.categories[0].score), kps))
        return sorted(out, key=lambda t: -t[1])

    def close(self) -> None:
        if self._det is not None:
            self._det.close()
            self._det = None

    def __enter__(self) -> MediaPipeFaceDetector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
