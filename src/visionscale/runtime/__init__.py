"""Accelerated inference: one Runner over eager PyTorch, torch.compile, ONNX Runtime and TensorRT.

>>> from visionscale.runtime import Runner, export_onnx
>>> runner = Runner("efficientad_tiny", backend="onnxruntime", device="cpu", image_size=128)
>>> out = runner(images); runner.info["provider"]

The runtime core imports no domain package (anomaly, classify, detection, face, study):
it runs an ``nn.Module`` and asks it for its input facts (:mod:`visionscale.modelinfo`).
Benchmarking across tasks lives above the domains, in :mod:`visionscale.deploy`.

See docs/runtime.md. Heavy dependencies (onnxruntime, onnxscript, torch_tensorrt) are
imported only by the backends that need them.
"""

from visionscale._deprecated import moved
from visionscale.runtime.errors import BackendUnavailableError, ExportError, RunnerError
from visionscale.runtime.precision import PRECISIONS, PrecisionError
from visionscale.runtime.runner import Runner, accelerate, resolve_device, runtime_info


# Lazy: export imports torch.onnx and friends. The bench names moved up to visionscale.deploy.
__getattr__ = moved(__name__, {n: f"visionscale.deploy.bench:{n}" for n in ("bench", "BenchConfig", "BenchResult")},
                    lazy={n: f"visionscale.runtime.export:{n}"
                          for n in ("export_onnx", "export_tensorrt", "export_model", "ExportResult")})


__all__ = ["BackendUnavailableError", "ExportError", "PRECISIONS", "PrecisionError", "Runner", "RunnerError", "accelerate",
           "resolve_device", "runtime_info", "export_onnx", "export_tensorrt", "export_model", "ExportResult", "bench",
           "BenchConfig", "BenchResult"]
