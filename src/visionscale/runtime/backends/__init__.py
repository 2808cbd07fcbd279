"""Runner backends: one class per way of running a model.

Every backend is called with an input tensor ``(B, C, H, W)`` and returns what the eager
model returns (tensor, tuple or dict of tensors), floating outputs cast back to fp32 so
downstream code does not change with the precision. ``info()`` says what actually runs.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor

BACKENDS = ("eager", "compile", "onnxruntime", "tensorrt")


class Backend(Protocol):
    name: str

    def __call__(self, x: Tensor) -> Any: ...

    def info(self) -> dict[str, Any]: ...
