"""Least-squares quadratic fit and extrapolation (seed 000, Eq. 3-4).

``y = beta0 + beta1 * x + beta2 * x**2`` with ``x`` the side length of a square image in
pixels, fitted by minimising ``sum_j (p(x_j) - y_j)**2``. With exactly three resolutions
(the seed's 256/512/1024) the quadratic passes through every point and R^2 is 1 by
construction; it says nothing about extrapolation. The study therefore also evaluates the
analytic memory directly at the extrapolation target, so the fit can be checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QuadraticFit:
    beta0: float
    beta1: float
    beta2: float
    r2: float
    n: int

    def __call__(self, x: float | np.ndarray) -> float | np.ndarray:
        return self.beta0 + self.beta1 * x + self.beta2 * np.square(x)

    def solve(self, y: float, x_max: float = 1e6) -> float | None:
        """Smallest ``x > 0`` where the fit reaches ``y`` (None if it never does below ``x_max``)."""
        if self(0.0) >= y:
            return 0.0
        a, b, c = self.beta2, self.beta1, self.beta0 - y
        roots: list[float] = []
        if abs(a) < 1e-30:
            if abs(b) > 1e-30:
                roots = [-c / b]
        else:
            disc = b * b - 4 * a * c
            if disc >= 0:
                sq = math.sqrt(disc)
                roots = [(-b - sq) / (2 * a), (-b + sq) / (2 * a)]
        positive = sorted(r for r in roots if 0 < r <= x_max)
        return positive[0] if positive else None


def fit_quadratic(x, y) -> QuadraticFit:
    """Least-squares fit of a degree-2 polynomial; needs at least three distinct ``x``."""
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length, got {xs.shape} and {ys.shape}")
    if len(np.unique(xs)) < 3:
        raise ValueError(f"a quadratic fit needs at least 3 distinct resolutions, got {sorted(set(xs.tolist()))}")
    # Scale x to ~1 so the normal equations are well conditioned at x ~ 1e3..1e4.
    scale = float(np.max(np.abs(xs)))
    design = np.stack([np.ones_like(xs), xs / scale, (xs / scale) ** 2], axis=1)
    coef, *_ = np.linalg.lstsq(design, ys, rcond=None)
    b0, b1, b2 = float(coef[0]), float(coef[1]) / scale, float(coef[2]) / scale**2
    pred = b0 + b1 * xs + b2 * xs**2
    ss_res = float(np.sum((ys - pred) ** 2))
    ss_tot = float(np.sum((ys - ys.mean()) ** 2))
    # Constant data (parameter bytes) has no variance to explain: R^2 is 1 if it is matched.
    tiny = 1e-18 * max(1.0, float(np.sum(ys**2)))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > tiny else (1.0 if ss_res <= tiny else 0.0)
    return QuadraticFit(b0, b1, b2, r2, len(xs))
