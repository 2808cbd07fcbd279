import numpy as np
import pytest

from visionscale.study.fit import fit_quadratic


def test_recovers_known_polynomial_exactly():
    x = np.array([256, 512, 768, 1024, 2048])
    y = 1.5e6 + 300.0 * x + 52.0 * x**2
    f = fit_quadratic(x, y)
    assert f.beta0 == pytest.approx(1.5e6, rel=1e-6)
    assert f.beta1 == pytest.approx(300.0, rel=1e-6)
    assert f.beta2 == pytest.approx(52.0, rel=1e-9)
    assert f.r2 == pytest.approx(1.0)
    assert f(3000) == pytest.approx(1.5e6 + 300 * 3000 + 52 * 3000**2, rel=1e-9)


def test_least_squares_with_noise_matches_numpy_polyfit():
    rng = np.random.default_rng(0)
    x = np.linspace(100, 2000, 12)
    y = 3 + 2 * x + 0.5 * x**2 + rng.normal(0, 1e4, x.size)
    f = fit_quadratic(x, y)
    b2, b1, b0 = np.polyfit(x, y, 2)
    assert (f.beta0, f.beta1, f.beta2) == pytest.approx((b0, b1, b2), rel=1e-6)
    assert 0.99 < f.r2 < 1.0


def test_solve_inverts_the_fit():
    f = fit_quadratic([1, 2, 3, 4], [10 + 4 * v * v for v in [1, 2, 3, 4]])
    assert f.solve(10 + 4 * 50.0**2) == pytest.approx(50.0)
    assert f.solve(5) == 0.0  # already above the limit at x = 0
    flat = fit_quadratic([1, 2, 3], [7, 7, 7])
    assert flat.solve(100) is None and flat.r2 == 1.0


def test_needs_three_distinct_points():
    with pytest.raises(ValueError, match="at least 3 distinct"):
        fit_quadratic([256, 256, 512], [1, 1, 2])
