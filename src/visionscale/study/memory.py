"""Analytic memory of a component from shapes alone, on the ``meta`` device.

Two activation numbers are computed in one pass, because they answer different questions:

* ``activation_sum_bytes`` is seed 000's Eq. 1 term ``sum_l a(l) * d_a``: the bytes of
  every layer's output (Eq. 3: ``H_out * W_out * C_out`` per conv), summed over all
  executed leaf modules, plus the outputs of tensor operations that run outside any leaf
  module (``torch.cat``, ``interpolate``, a residual ``+`` in a model's own ``forward``),
  which are layers in all but name. A leaf module counts as one layer: its internal
  temporaries (the distance blocks inside PatchCore's search module) show up in the peak,
  not in the sum. It is what the seed plots.
* ``activation_peak_bytes`` is the largest number of bytes held at once by tensors the
  component allocated. Intermediate tensors are freed as soon as nothing refers to them,
  and in-place ops and views allocate nothing, so this is what really has to fit on a GPU
  on top of the parameters and the inputs.

Running on ``meta`` allocates nothing, so a 3000x3000 px pass costs the same as 256x256.
"""

from __future__ import annotations

import copy
import weakref
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from visionscale.components import Component, State, components_of, module_bytes


@dataclass
class LayerRecord:
    """One executed leaf module (or free-standing op) and the bytes of its output."""

    name: str
    kind: str
    shape: tuple[int, ...]
    bytes: int


@dataclass
class MemoryEstimate:
    """Analytic memory of one component at one input size."""

    params_bytes: int
    input_bytes: int
    activation_sum_bytes: int
    activation_peak_bytes: int
    layers: list[LayerRecord] = field(default_factory=list)

    @property
    def total_sum_bytes(self) -> int:
        """Seed Eq. 1: parameters plus the sum of all activations."""
        return self.params_bytes + self.activation_sum_bytes

    @property
    def total_peak_bytes(self) -> int:
        """What must be resident at the worst moment: params, inputs, live activations."""
        return self.params_bytes + self.input_bytes + self.activation_peak_bytes


def _storage_key(t: Tensor) -> int:
    return t.untyped_storage()._cdata


def _tensors(obj) -> list[Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, Tensor)]


class _Tracker(TorchDispatchMode):
    """Counts bytes of tensors created inside the mode and how many are alive at once.

    Storages are reference-counted by the tensors that use them: a view or an in-place
    result adds a reference to an existing storage instead of new bytes, and the bytes are
    released when the last tensor using the storage is garbage-collected.
    """

    def __init__(self, external: set[int]):
        super().__init__()
        self.external = external  # storages that existed before: params, buffers, inputs
        self.refs: dict[int, list[int]] = {}  # storage key -> [nbytes, live tensor count]
        self.live = 0
        self.peak = 0
        self.active = True
        self.leaf_depth = 0  # > 0 while inside a leaf module (its output is counted by a hook)
        self.free_ops: list[LayerRecord] = []

    def _release(self, key: int) -> None:
        entry = self.refs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self.refs[key]
            if self.active:
                self.live -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.active:
            return out
        new_bytes = 0
        shape: tuple[int, ...] = ()
        for t in _tensors(out):
            key = _storage_key(t)
            if key in self.external:
                continue
            entry = self.refs.get(key)
            if entry is None:
                nbytes = t.untyped_storage().nbytes()
                self.refs[key] = [nbytes, 1]
                self.live += nbytes
                new_bytes += nbytes
                shape = tuple(t.shape)
            else:
                entry[1] += 1
            weakref.finalize(t, self._release, key)
        self.peak = max(self.peak, self.live)
        if new_bytes and self.leaf_depth == 0:
            self.free_ops.append(LayerRecord(str(func.overloadpacket.__name__), "op", shape, new_bytes))
        return out


def _is_leaf(m: nn.Module) -> bool:
    return next(iter(m.children()), None) is None


def _state_bytes(state: State) -> int:
    seen: set[int] = set()
    total = 0
    for t in state.values():
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def estimate_component(part: Component, state: State) -> tuple[MemoryEstimate, State]:
    """Analytic memory of ``part`` run once on ``state``; returns the estimate and its outputs.

    The module and the state should live on the ``meta`` device (real tensors work too,
    but then the pass really computes). Parameters and buffers count once even when the
    component runs ``repeats`` times: they are reused, as is the activation memory.
    """
    external = {_storage_key(t) for t in state.values()}
    for t in list(part.module.parameters()) + list(part.module.buffers()):
        external.add(_storage_key(t))
    tracker = _Tracker(external)
    records: list[LayerRecord] = []
    names = {m: n for n, m in part.module.named_modules()}

    def pre_hook(module, args):
        tracker.leaf_depth += 1

    def post_hook(module, args, output):
        tracker.leaf_depth -= 1
        for t in _tensors(output):
            records.append(LayerRecord(names.get(module, type(module).__name__), type(module).__name__,
                                       tuple(t.shape), t.numel() * t.element_size()))

    with ExitStack() as stack:
        for m in part.module.modules():
            if _is_leaf(m):
                stack.callback(m.register_forward_pre_hook(pre_hook).remove)
                stack.callback(m.register_forward_hook(post_hook).remove)
        with torch.no_grad(), tracker:
            out = part.run(state)
        tracker.active = False
    records.extend(tracker.free_ops)
    estimate = MemoryEstimate(
        params_bytes=module_bytes(part.module),
        input_bytes=_state_bytes(state),
        activation_sum_bytes=sum(r.bytes for r in records),
        activation_peak_bytes=tracker.peak,
        layers=records,
    )
    return estimate, out


def estimate_model(parts: list[Component], image: Tensor) -> dict[str, MemoryEstimate]:
    """Analytic memory of each component in execution order, chaining their states."""
    state: State = {"image": image}
    results: dict[str, MemoryEstimate] = {}
    for part in parts:
        estimate, out = estimate_component(part, state)
        results[part.name] = estimate
        state.update(out)
        # Later repeats only advance the state. On the meta device they would allocate the
        # same shapes again, so they are skipped (a DDAD pass at 3000 px stays ~0.3 s).
        if image.device.type != "meta":
            for _ in range(part.repeats - 1):
                with torch.no_grad():
                    state.update(part.run(state))
    return results


def model_totals(estimates: dict[str, MemoryEstimate], params_bytes: int | None = None) -> dict[str, int]:
    """Whole-model numbers from per-component estimates.

    Components run one after another, so the model's peak is all parameters plus the worst
    component's inputs and live activations; the seed's Eq. 1 total is a plain sum.
    ``params_bytes`` overrides the parameter total when components share modules.
    """
    params = params_bytes if params_bytes is not None else sum(e.params_bytes for e in estimates.values())
    act_sum = sum(e.activation_sum_bytes for e in estimates.values())
    worst = max((e.input_bytes + e.activation_peak_bytes for e in estimates.values()), default=0)
    return {
        "params_bytes": params,
        "activation_sum_bytes": act_sum,
        "total_sum_bytes": params + act_sum,
        "total_peak_bytes": params + worst,
    }


def parts_totals(estimates: dict[str, MemoryEstimate], parts: list[Component]) -> dict[str, int]:
    """:func:`model_totals` of a model's components, a module shared by two components (one
    backbone used twice) counting once in the parameters."""
    return model_totals(estimates, module_bytes(nn.ModuleList([p.module for p in parts])))


def peak_bytes(model: nn.Module, image: Tensor) -> int:
    """Analytic peak of one forward of ``model`` (on ``meta``) on ``image``: parameters and buffers
    once, plus the worst component's inputs and live activations (``total_peak_bytes``)."""
    parts = components_of(model)
    return parts_totals(estimate_model(parts, image), parts)["total_peak_bytes"]


def to_meta(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of ``module`` on the ``meta`` device (in ``dtype``, floating tensors only), in eval mode.

    Parameters and buffers are replaced by meta tensors of the same shape *before* the copy, so a
    fitted model's large buffers (a PatchCore memory bank) are never duplicated in host memory;
    ``module`` itself is left as it was.
    """
    memo: dict[int, object] = {}
    for t in module.parameters():
        memo[id(t)] = nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
    for t in module.buffers():
        memo[id(t)] = torch.empty_like(t, device="meta")
    copied = copy.deepcopy(module, memo)
    return copied.to(device="meta", dtype=dtype).eval() if dtype is not None else copied.to("meta").eval()
