"""The ONNX file a :class:`~visionscale.face.detector.FaceDetector` runs in ONNX Runtime, exported
once per set of weights and cached next to the imported safetensors weights.

The export (``torch.export`` + ``torch.onnx``, then the parity check of
:func:`visionscale.runtime.export.export_onnx`) takes 5-15 s on a CPU; the file it writes is
reused by every later detector with the same weights: ``<torch hub dir>/checkpoints/
visionscale-face/blazeface_<variant>-<key>.onnx`` (and its ``.onnx.json`` report), where the key
hashes the weights, the architecture and :data:`GRAPH_VERSION`. A folder that cannot be written
falls back to a temporary one that lives as long as the caller keeps it.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import torch
from torch import nn

__all__ = ["GRAPH_VERSION", "graph_key", "onnx_for", "onnx_available"]

# Bump when the exported graph changes for the same weights (BlazeFaceGraph's layout, opset).
GRAPH_VERSION = 1


def graph_key(net: nn.Module) -> str:
    """A hex digest of what the exported graph depends on: weights, architecture, graph version."""
    from visionscale.face.blazeface_graph import ALIGN

    h = hashlib.sha256(f"v{GRAPH_VERSION} align{ALIGN} {net.config!r}".encode())
    for name, t in net.state_dict().items():
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def onnx_available(cached: Path | None = None) -> bool:
    """ONNX Runtime is importable, and the graph is cached or the exporter (onnxscript) is installed."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        return False
    return (cached is not None and cached.is_file()) or importlib.util.find_spec("onnxscript") is not None


def cache_path(net: nn.Module) -> Path:
    from visionscale.face.tflite_import import cache_dir

    return cache_dir() / f"blazeface_{net.config.name}-{graph_key(net)[:16]}.onnx"


def onnx_for(net: nn.Module, refresh: bool = False) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """The ONNX file of ``net`` (exported now unless cached) and, when the cache folder could not
    be written, the temporary folder holding it (keep it referenced while the file is in use).

    Args:
        net: A :class:`~visionscale.face.blazeface.BlazeFace` (any device; it is not modified).
        refresh: Export again even if a cached file exists (a damaged one).

    Raises:
        RunnerError: The export failed its parity check against the eager model.
        ExportError, BackendUnavailableError: As :func:`visionscale.runtime.export.export_onnx`.
    """
    from visionscale.errors import OutputError
    from visionscale.runtime.errors import RunnerError
    from visionscale.runtime.export import export_onnx

    path = cache_path(net)
    sidecar = Path(str(path) + ".json")
    if path.is_file() and sidecar.is_file() and not refresh:
        return path, None
    size = net.config.input_size
    source = net
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in net.parameters()):
        import copy

        source = copy.deepcopy(net).to("cpu", torch.float32)  # export_onnx moves the module it is given
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        result = export_onnx(source, path, image_size=(size, size), overwrite=True)
    except (OutputError, OSError):  # a read-only cache folder: export into a private temporary one
        tmp = tempfile.TemporaryDirectory(prefix="visionscale-blazeface-")
        path = Path(tmp.name) / path.name
        result = export_onnx(source, path, image_size=(size, size))
    if not result.parity_ok:
        worst = [c for c in result.parity if not c.get("ok")]
        for p in (path, Path(str(path) + ".json")):
            p.unlink(missing_ok=True)
        raise RunnerError(f"the ONNX export of BlazeFace[{net.config.name}] differs from the eager model: {worst}")
    return path, tmp
