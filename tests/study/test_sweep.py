"""The study on small user modules: rows, fits, GPU limits, OOM handling, bad input."""

import json

import pytest
import torch
from torch import nn

from visionscale.io.outputs import MANIFEST
from visionscale.study import GPU, StudyConfig, StudyError, run_study, write_outputs
from visionscale.study.gpus import parse_gpu, parse_size
from visionscale.registry import UnknownModelError


def small_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1))


def cfg(**kw):
    base = dict(models=("net",), resolutions=(16, 32, 64), target=200, warmup=0, repeats=2,
                gpus=(GPU("tiny card", 64 * 1024**2),), cuda_context_bytes=1024**2, device="cpu")
    base.update(kw)
    return StudyConfig(**base)


def test_rows_fits_and_limits_for_a_user_module():
    result = run_study(cfg(), modules={"net": small_net()})
    assert [r["resolution"] for r in result.rows] == [16, 32, 64]
    r32 = result.rows[1]
    assert r32["activation_sum_bytes"] == (8 * 32 * 32 * 2 + 4 * 16 * 16) * 4
    assert r32["time_n"] == 2 and r32["time_device"] == "cpu" and r32["time_ms_mean"] > 0
    fit = next(f for f in result.fits if f["component"] == "total" and f["metric"] == "activation_sum_bytes")
    assert fit["beta2"] == pytest.approx((8 * 2 + 4 / 4) * 4)  # bytes per px^2
    assert fit["prediction_at_target"] == pytest.approx((8 * 2 + 1) * 4 * 200**2, rel=1e-6)
    check = next(c for c in result.checks if c["metric"] == "total_peak_bytes")
    assert abs(check["relative_error"]) < 1e-9  # pure conv net: exactly quadratic
    (limit,) = result.gpu_limits
    # the fitted peak at the limit fits into the card minus the context, one more px does not
    peak = next(f for f in result.fits if f["component"] == "total" and f["metric"] == "total_peak_bytes")
    at = lambda x: peak["beta0"] + peak["beta1"] * x + peak["beta2"] * x * x
    budget = 63 * 1024**2
    assert at(limit["max_resolution"]) <= budget < at(limit["max_resolution"] + 1)
    assert limit["max_resolution_analytic"] % 32 == 0
    assert abs(limit["max_resolution_analytic"] - limit["max_resolution"]) <= 32


class OOMAbove(nn.Module):
    """Raises the CUDA out-of-memory error for inputs wider than ``limit`` (simulated OOM)."""

    def __init__(self, limit):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.limit = limit

    def forward(self, x):
        if x.device.type != "meta" and x.shape[-1] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.conv(x)


def test_out_of_memory_marks_resolution_and_goes_on():
    result = run_study(cfg(resolutions=(16, 32, 64, 128)), modules={"net": OOMAbove(40)})
    status = {r["resolution"]: r["status"] for r in result.rows}
    assert status == {16: "ok", 32: "ok", 64: "oom", 128: "oom"}
    assert all(r["time_ms_mean"] is None for r in result.rows if r["status"] == "oom")
    assert result.rows[-1]["activation_sum_bytes"] > 0  # analytic numbers are still there


def test_other_errors_are_not_swallowed():
    class Broken(nn.Module):
        def forward(self, x):
            if x.device.type != "meta":
                raise RuntimeError("shape mismatch somewhere")
            return x * 2

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_study(cfg(), modules={"net": Broken()})


def test_time_budget_skips_what_does_not_fit():
    result = run_study(cfg(time_budget_s=0.0), modules={"net": small_net()})
    status = [r["status"] for r in result.rows]
    assert status[0] == "ok" and result.rows[0]["time_n"] == 1  # the probe run is all there is
    assert set(status[1:]) == {"skipped_time_budget"}


@pytest.mark.parametrize("res,msg", [((0, 32, 64), "resolutions must be >= 1"), ((16, "a", 64), "must be an integer"),
                                     ((), "no resolutions")])
def test_bad_resolutions(res, msg):
    with pytest.raises(StudyError, match=msg):
        run_study(cfg(resolutions=res), modules={"net": small_net()})


def test_size_constraints_are_checked_before_any_work():
    class Needs32(nn.Module):
        calls = 0

        def validate_input_size(self, h, w):
            if h % 32 or w % 32:
                raise ValueError(f"needs multiples of 32, got {h}x{w}")

        def forward(self, x):
            Needs32.calls += 1
            return x

    with pytest.raises(StudyError, match="cannot run at 48x48: needs multiples of 32"):
        run_study(cfg(resolutions=(32, 48, 64)), modules={"net": Needs32()})
    assert Needs32.calls == 0


def test_unknown_model_lists_known_names():
    with pytest.raises(UnknownModelError, match="known models: .*efficientad_m"):
        run_study(cfg(models=("nope",)))


def test_gpu_specs():
    assert parse_size("24GiB") == 24 * 1024**3
    assert parse_size("16000 MiB") == 16000 * 1024**2
    assert parse_size("80GB") == 80 * 1000**3
    assert parse_size("1TiB") == 1024**4 and parse_size("2TB") == 2 * 1000**4
    assert parse_gpu("RTX 6000 Ada=48GiB") == GPU("RTX 6000 Ada", 48 * 1024**3)
    with pytest.raises(ValueError, match="NAME=SIZE"):
        parse_gpu("48GiB")
    with pytest.raises(ValueError, match="cannot read memory size"):
        parse_size("lots")


def test_outputs_are_complete_and_parse(tmp_path):
    result = run_study(cfg(), modules={"net": small_net()})
    files = {p.name for p in write_outputs(result, tmp_path)}
    assert {"results.json", "rows.csv", "fits.csv", "gpu_limits.csv", "report.md", "components_net.png",
            "memory_extrapolated.png", "runtime_extrapolated.png"} <= files
    data = json.loads((tmp_path / "results.json").read_text())
    for key in ("model", "component", "resolution", "dtype", "device", "params_bytes", "activation_sum_bytes",
                "activation_peak_bytes", "measured_peak_bytes", "time_ms_mean", "time_ms_median", "time_ms_p95"):
        assert key in data["rows"][0]
    assert {"model", "component", "metric", "beta0", "beta1", "beta2", "r2"} <= set(data["fits"][0])
    assert {"model", "gpu", "vram_bytes", "max_resolution"} <= set(data["gpu_limits"][0])
    assert (tmp_path / "memory_extrapolated.png").read_bytes()[:4] == b"\x89PNG"
    # no temp files left; the one hidden file is the manifest of what the study wrote
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [MANIFEST]


def test_precision_axis_gives_rows_fits_and_limits_per_dtype(tmp_path):
    result = run_study(cfg(dtype="fp32,fp16", time_budget_s=30.0), modules={"net": small_net()})
    assert result.config["dtypes"] == ["fp32", "fp16"] and result.config["dtype"] == "fp32,fp16"
    assert result.config["time_budget_s"] == pytest.approx(30.0)  # split between the dtypes, total kept
    by = {(r["dtype"], r["resolution"]): r for r in result.rows}
    assert len(result.rows) == 6
    for r in (16, 32, 64):
        assert by[("fp16", r)]["activation_sum_bytes"] * 2 == by[("fp32", r)]["activation_sum_bytes"]
        assert by[("fp16", r)]["params_bytes"] * 2 == by[("fp32", r)]["params_bytes"]
        assert by[("fp16", r)]["status"] == "ok" and by[("fp16", r)]["time_ms_mean"] > 0  # fp16 really ran on the CPU
    for key in ("fits", "gpu_limits", "checks", "totals"):
        assert {x["dtype"] for x in getattr(result, key)} == {"fp32", "fp16"}, key
    lim = {g["dtype"]: g for g in result.gpu_limits}
    # half the bytes per pixel: the largest side grows by about sqrt(2) (the context and params are fixed)
    assert 1.3 < lim["fp16"]["max_resolution"] / lim["fp32"]["max_resolution"] < 1.45
    files = {p.name for p in write_outputs(result, tmp_path)}
    assert {"components_net.png", "components_net_fp16.png", "memory_extrapolated.png"} <= files
    report = (tmp_path / "report.md").read_text()
    assert "| dtype | model | GPU |" in report and "| fp16 | net | tiny card |" in report


def test_single_dtype_study_is_unchanged():
    result = run_study(cfg(timing=False), modules={"net": small_net()})
    assert result.config["dtype"] == "fp32" and result.config["dtypes"] == ["fp32"]
    assert {r["dtype"] for r in result.rows} == {"fp32"}


def test_bad_dtype_in_the_axis_fails_before_any_work():
    with pytest.raises(StudyError, match="dtype must be one of .*'fp8'"):
        run_study(cfg(dtype=("fp32", "fp8")), modules={"net": small_net()})


def test_tile_plans_give_the_tile_that_fits_and_the_time_per_image(tmp_path):
    import math

    from visionscale.study.gpus import TILE_SENSORS_MP, sensor_side
    from visionscale.study.report import plot_tile_plans
    from visionscale.tiling import default_overlap, tile_count

    # "small": the 64 MiB card minus the 1 MiB context holds ~1400 px, less than a 5 MP image (2236 px);
    # "huge" holds far more than a 20 MP image.
    gpus = (GPU("small", 64 * 1024**2), GPU("huge", 80 * 1024**3))
    # (a cap of 8192 px keeps the search short and is still above a 20 MP image's 4472 px)
    result = run_study(cfg(gpus=gpus, resolutions=(32, 64, 128), limit_cap=8192), modules={"net": small_net()})
    plans = {(p["gpu"], p["megapixels"]): p for p in result.tile_plans}
    assert set(plans) == {(g.name, mp) for g in gpus for mp in TILE_SENSORS_MP}
    limit = {g["gpu"]: g["max_resolution_analytic"] for g in result.gpu_limits}
    time_fit = next(f for f in result.fits if f["component"] == "total" and f["metric"] == "time_ms_mean")
    for (gpu, mp), p in plans.items():
        side = sensor_side(mp)
        assert p["image_side_px"] == side and p["tile_limit_px"] == limit[gpu] and p["tile_limit_source"] == "analytic"
        if gpu == "huge":
            assert p["tile_limit_capped"] and (p["tiles"], p["tile_px"], p["whole_image"]) == (1, side, True)
        else:
            assert not p["whole_image"] and p["tile_px"] == limit[gpu] < side
            assert p["overlap_px"] == default_overlap(p["tile_px"], 0, 1) > 0
            assert p["tiles"] == tile_count(side, side, (p["tile_px"],) * 2, (p["overlap_px"],) * 2) > 1
        ms = time_fit["beta0"] + time_fit["beta1"] * p["tile_px"] + time_fit["beta2"] * p["tile_px"] ** 2
        if ms > 0:  # the CPU fit is noisy; where it extrapolates below zero there is no estimate
            # same formula as the study's, so only float rounding separates them
            assert p["seconds_per_image"] == pytest.approx(p["tiles"] * ms / 1e3, rel=1e-9)
            assert p["time_device"] == "cpu"
        else:
            assert p["seconds_per_image"] is None
    # more pixels need at least as many tiles
    counts = [plans[("small", mp)]["tiles"] for mp in TILE_SENSORS_MP]
    assert counts == sorted(counts) and math.prod(counts) > 1
    # (plots off: they take seconds; the CLI test writes every plot, tile_plans.png included)
    files = {p.name for p in write_outputs(result, tmp_path, plots=False)}
    assert "tile_plans.csv" in files
    assert plot_tile_plans(result)[:4] == b"\x89PNG"
    report = (tmp_path / "report.md").read_text()
    assert "## Tiles that fit: native-resolution images on each GPU" in report
    assert "times on the CPU that ran the study" in report
    small = plans[("small", 12.0)]
    assert f"| net | small | {small['tile_limit_px']} |" in report and f"{small['tiles']} × {small['tile_px']} px" in report
    assert json.loads((tmp_path / "results.json").read_text())["tile_plans"][0].keys() == result.tile_plans[0].keys()


def test_tile_plans_without_timing_and_below_the_smallest_resolution():
    # 1 MiB context + 0.5 MB: a 128 px pass (input + conv + relu outputs, ~1.2 MB) does not fit, 64 px (0.3 MB) does
    result = run_study(cfg(timing=False, resolutions=(128, 256, 512), gpus=(GPU("crumb", 1024**2 + 500_000),)),
                       modules={"net": small_net()})
    assert result.gpu_limits[0]["max_resolution_analytic"] is None
    p = result.tile_plans[0]
    assert 64 <= p["tile_limit_px"] < 128 and p["tiles"] > 100
    assert p["seconds_per_image"] is None and p["time_device"] is None


def test_whole_image_the_model_does_not_accept_is_tiled():
    class Needs32(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)

        def validate_input_size(self, h, w):
            if h % 32 or w % 32:
                raise ValueError("needs multiples of 32")

        def forward(self, x):
            return self.conv(x)

    result = run_study(cfg(timing=False, resolutions=(32, 64, 96), gpus=(GPU("huge", 80 * 1024**3),)),
                       modules={"net": Needs32()})
    p = next(p for p in result.tile_plans if p["megapixels"] == 5.0)  # 2236 px: not a multiple of 32
    assert p["tile_px"] == 2208 and p["tiles"] == 4 and not p["whole_image"]


def test_tile_plan_times_scale_by_area_with_fewer_than_three_timed_sizes():
    """Two timed resolutions give no quadratic fit: each tile's time is the largest timed size's
    total scaled by the pixel count, and the rows say so (the default CPU run times too few sizes)."""
    gpus = (GPU("small", 64 * 1024**2),)
    result = run_study(cfg(gpus=gpus, resolutions=(32, 64), limit_cap=8192), modules={"net": small_net()})
    assert not any(f["metric"] == "time_ms_mean" and f["component"] == "total" for f in result.fits)
    ms_64 = sum(r["time_ms_mean"] for r in result.rows if r["resolution"] == 64)
    for p in result.tile_plans:
        assert p["time_rule"] == "area scaling from 64 px"
        # the study's formula written out again: only float rounding separates the two
        assert p["seconds_per_image"] == pytest.approx(p["tiles"] * ms_64 * (p["tile_px"] / 64) ** 2 / 1e3, rel=1e-9)
