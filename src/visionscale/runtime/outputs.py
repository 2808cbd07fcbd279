"""Flatten a model's outputs to named tensors and back.

ONNX graphs and TensorRT engines return a flat list of tensors; our models return a
tensor, a tuple (the detector's ``(cls_logits, box_deltas)``) or a dict (the anomaly
models' ``{"anomaly_map", "pred_score"}``). :class:`OutputSpec` records the structure so a
runtime can hand back exactly what the eager model returns, and gives every tensor a
stable name: the dict key, ``output`` for a single tensor, ``output0``, ``output1``... for
a tuple.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


def tree_map(fn, out: Any) -> Any:
    """``fn`` applied to every tensor of an output (tensor, tuple/list, dict), structure kept."""
    if isinstance(out, Tensor):
        return fn(out)
    if isinstance(out, dict):
        return {k: tree_map(fn, v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return type(out)(tree_map(fn, v) for v in out)
    return out


@dataclass(frozen=True)
class OutputSpec:
    kind: str  # "tensor" | "tuple" | "list" | "dict"
    names: tuple[str, ...]

    @classmethod
    def of(cls, out: Any) -> OutputSpec:
        if isinstance(out, Tensor):
            return cls("tensor", ("output",))
        if isinstance(out, dict):
            bad = [k for k, v in out.items() if not isinstance(v, Tensor) or not isinstance(k, str)]
            if bad:
                raise TypeError(f"model output dict has non-tensor entries {bad}; only tensors can be exported")
            return cls("dict", tuple(out))
        if isinstance(out, (tuple, list)):
            if not all(isinstance(v, Tensor) for v in out):
                raise TypeError("model output tuple holds non-tensors; only flat tuples of tensors can be exported")
            return cls("tuple" if isinstance(out, tuple) else "list", tuple(f"output{i}" for i in range(len(out))))
        raise TypeError(f"model returned {type(out).__name__}; expected a tensor, a tuple/list or a dict of tensors")

    def flatten(self, out: Any) -> tuple[Tensor, ...]:
        if self.kind == "tensor":
            return (out,)
        if self.kind == "dict":
            return tuple(out[k] for k in self.names)
        return tuple(out)

    def unflatten(self, flat: list | tuple) -> Any:
        if len(flat) != len(self.names):
            raise ValueError(f"expected {len(self.names)} outputs {list(self.names)}, got {len(flat)}")
        if self.kind == "tensor":
            return flat[0]
        if self.kind == "dict":
            return dict(zip(self.names, flat))
        return tuple(flat) if self.kind == "tuple" else list(flat)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "names": list(self.names)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OutputSpec:
        return cls(str(d["kind"]), tuple(d["names"]))


class FlatOutputs(nn.Module):
    """Wraps a model so ``forward`` returns its outputs as a flat tuple in ``spec`` order."""

    def __init__(self, model: nn.Module, spec: OutputSpec) -> None:
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.spec.flatten(self.model(x))


def max_differences(ref: Any, got: Any, spec: OutputSpec | None = None) -> dict[str, dict[str, float]]:
    """Per named output: max absolute difference and max relative difference vs ``ref``.

    The relative difference is ``max |got - ref| / max |ref|``: relative to the output's
    range, so near-zero reference values (which any elementwise ratio blows up) do not
    dominate it.
    """
    spec = spec or OutputSpec.of(ref)
    out: dict[str, dict[str, float]] = {}
    for name, a, b in zip(spec.names, spec.flatten(ref), spec.flatten(got)):
        a = a.detach().float().cpu()
        b = torch.as_tensor(b).detach().float().cpu()
        if a.shape != b.shape:
            raise ValueError(f"output {name!r}: shape {tuple(b.shape)} differs from the eager model's {tuple(a.shape)}")
        diff = (a - b).abs()
        scale = float(a.abs().max()) if a.numel() else 0.0
        worst = float(diff.max()) if diff.numel() else 0.0
        out[name] = {
            "max_abs": worst,
            "max_rel": worst / scale if scale > 0 else (0.0 if worst == 0 else float("inf")),
            "ref_max_abs": scale,
        }
    return out
