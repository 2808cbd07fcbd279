"""Named model components: the unit the profiler attributes memory and time to.

A model that wants per-component numbers implements ``components()`` and returns its
parts in execution order (CONVENTIONS §11). Each part reads what it needs from a shared
``state`` dict (it starts as ``{"image": x}``) and returns new entries for it, so parts
that are not a simple chain (EfficientAD's teacher, student and autoencoder all read the
image) need no special casing in the profiler.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

State = dict[str, Tensor]


@dataclass(frozen=True)
class Component:
    """One measurable part of a model.

    Attributes:
        name: Stable name used in results (``"teacher"``, ``"nn_search"``...).
        module: Module that owns the parameters and buffers counted for this part.
        run: Reads inputs from the state, returns the entries it produces.
        repeats: How often the part runs per image (DDAD's denoiser runs once per
            denoising step): memory is counted once, time is multiplied by it.
    """

    name: str
    module: nn.Module
    run: Callable[[State], State]
    repeats: int = 1


def components_of(model: nn.Module) -> list[Component]:
    """The model's own components, or the whole model as one component ``"model"``."""
    if hasattr(model, "components"):
        parts = list(model.components())
        names = [p.name for p in parts]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate component names in {type(model).__name__}: {names}")
        return parts

    def run(state: State) -> State:
        out = model(state["image"])
        if isinstance(out, Tensor):
            return {"output": out}
        if isinstance(out, dict):
            return {k: v for k, v in out.items() if isinstance(v, Tensor)}
        if isinstance(out, (tuple, list)):
            return {f"output{i}": v for i, v in enumerate(out) if isinstance(v, Tensor)}
        raise TypeError(f"{type(model).__name__} returned {type(out).__name__}, expected tensors")

    return [Component("model", model, run)]


def run_components(parts: list[Component], image: Tensor) -> State:
    """Run all parts in order (each ``repeats`` times) and return the final state."""
    state: State = {"image": image}
    for part in parts:
        for _ in range(part.repeats):
            state.update(part.run(state))
    return state


def module_bytes(module: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of parameters and buffers (counted once even if shared), optionally as ``dtype``."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        size = t.element_size() if dtype is None or not t.is_floating_point() else torch.empty((), dtype=dtype).element_size()
        total += t.numel() * size
    return total
