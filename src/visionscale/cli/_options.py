"""The options many ``visionscale`` commands share: backend, precision and device.

Each is declared once here, with one help text and one default, and used as a type::

    def predict_cmd(..., device: Device = DEFAULT_DEVICE, backend: Backend = DEFAULT_BACKEND,
                    precision: Precision = DEFAULT_PRECISION) -> None:

Typer does not allow the default inside ``Annotated[..., typer.Option()]``, hence the
``DEFAULT_*`` constants. The names behind the help texts are the library's own vocabulary
(:mod:`visionscale.runtime.precision`, :func:`visionscale.device.resolve_device`).
"""

from __future__ import annotations

from typing import Optional, Annotated

import typer

from visionscale.device import DEVICE_HELP

DEFAULT_BACKEND = "eager"
DEFAULT_PRECISION = "fp32"
DEFAULT_DEVICE = "auto"

_BACKENDS = "eager, compile, onnxruntime or tensorrt"
_PRECISIONS = "fp32, fp16 or bf16"

Backend = Annotated[str, typer.Option("--backend", help=f"{_BACKENDS} (see `visionscale bench`).")]
Precision = Annotated[str, typer.Option("--precision", help=f"{_PRECISIONS} (see `visionscale bench`).")]
Device = Annotated[str, typer.Option("--device", help=f"{DEVICE_HELP}.")]

# Comma lists, for the commands that sweep over them (bench, scale).
Backends = Annotated[str, typer.Option("--backend", "-b", help="Comma list of eager, compile, onnxruntime, tensorrt.")]
Precisions = Annotated[str, typer.Option("--precision", "-p", help=f"Comma list of {_PRECISIONS.replace(' or ', ', ')}.")]


# Batch commands over files (`ad predict`, `face detect`): which engine runs them (docs/ray.md).
Engine = Annotated[str, typer.Option("--engine", help="local (this process) or ray (a Ray Data actor pool: "
                                     "a local Ray instance, or the cluster at --address); an interrupted ray "
                                     "job resumes when run again with the same arguments.")]
Address = Annotated[Optional[str], typer.Option("--address", help="--engine ray: a running Ray cluster, 'auto' or "
                                                "HOST:PORT (`ray start --head`) [default: start a local one].")]
CpusPerWorker = Annotated[int, typer.Option("--cpus-per-worker", min=1, help="--engine ray: CPU cores per Ray "
                                            "worker (without GPUs the pool has CPUs / this many workers).")]
