"""Float comparisons that hold on any x86-64 CPU (Intel and AMD alike).

Two correct float32 implementations differ by rounding that grows with the magnitude of what
they sum, and by how much depends on the CPU's vector width (the summation order of a kernel).
An absolute tolerance that passes for outputs near 1 then fails for logits near 100. Compare
against the scale of the reference instead, and say at the call site why ``rel`` is what it is.
"""

from __future__ import annotations

import numpy as np


def assert_close_to_scale(got, ref, *, rel: float, floor: float = 1.0) -> None:
    """``max|got - ref| <= rel * max(floor, max|ref|)``, with the numbers in the failure message."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    scale = max(floor, float(np.abs(ref).max(initial=0.0)))
    diff = float(np.abs(got - ref).max(initial=0.0))
    assert diff <= rel * scale, f"max |diff| {diff:.3g} > {rel:g} x scale {scale:.3g} (relative {diff / scale:.3g})"
