"""Analytic memory against hand-computed bytes (seed 000, Eq. 1-3)."""

import pytest
import torch
from torch import nn

from visionscale.components import Component, components_of
from visionscale.study.memory import estimate_component, estimate_model, model_totals


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


def test_one_conv_activation_is_hout_wout_cout_times_4():
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1).to("meta")
    est = estimate_model(components_of(conv), _meta(1, 3, 10, 12))["model"]
    h_out, w_out = 5, 6  # floor((10 + 2 - 3) / 2) + 1, floor((12 + 2 - 3) / 2) + 1
    assert est.activation_sum_bytes == h_out * w_out * 8 * 4
    assert est.activation_peak_bytes == h_out * w_out * 8 * 4
    assert est.params_bytes == (3 * 8 * 3 * 3 + 8) * 4  # Eq. 2
    assert est.input_bytes == 3 * 10 * 12 * 4
    assert [(r.name, r.shape) for r in est.layers] == [("", (1, 8, 5, 6))]


class ConvPoolResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        y = self.conv(x)  # (1, 4, 8, 8): 1024 B
        y = self.relu(y)  # 1024 B, conv output freed after this line
        y = y + x  # free-standing op: 1024 B
        return self.pool(y)  # (1, 4, 4, 4): 256 B


@pytest.mark.parametrize("dtype,size", [(torch.float32, 4), (torch.float16, 2), (torch.bfloat16, 2)])
def test_conv_pool_residual_sum_and_peak(dtype, size):
    net = ConvPoolResidual().to("meta", dtype)
    est = estimate_model(components_of(net), _meta(1, 4, 8, 8, dtype=dtype))["model"]
    plane = 4 * 8 * 8 * size
    assert est.activation_sum_bytes == 3 * plane + 4 * 4 * 4 * size
    # worst moment: conv output and relu output alive together (or relu + residual sum)
    assert est.activation_peak_bytes == 2 * plane
    assert est.params_bytes == (4 * 4 * 9 + 4) * size
    kinds = [r.kind for r in est.layers]
    assert kinds.count("op") == 1 and "Conv2d" in kinds and "AvgPool2d" in kinds


def test_inplace_and_views_allocate_nothing_new():
    net = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU(inplace=True), nn.Flatten()).to("meta")
    est = estimate_model(components_of(net), _meta(1, 2, 4, 4))["model"]
    conv_bytes = 2 * 4 * 4 * 4
    assert est.activation_peak_bytes == conv_bytes  # relu_ and flatten reuse the storage
    assert est.activation_sum_bytes == 3 * conv_bytes  # Eq. 1 counts every layer's output


def test_meta_matches_real_tensors():
    torch.manual_seed(0)
    net = ConvPoolResidual()
    real = estimate_model(components_of(net), torch.randn(1, 4, 8, 8))["model"]
    meta = estimate_model(components_of(ConvPoolResidual().to("meta")), _meta(1, 4, 8, 8))["model"]
    assert (real.activation_sum_bytes, real.activation_peak_bytes) == (meta.activation_sum_bytes, meta.activation_peak_bytes)


def test_components_chain_and_repeats_count_memory_once():
    a, b = nn.Conv2d(3, 6, 1).to("meta"), nn.Conv2d(6, 6, 1).to("meta")
    parts = [
        Component("first", a, lambda s: {"f": a(s["image"])}),
        Component("second", b, lambda s: {"f": b(s["f"])}, repeats=5),
    ]
    est = estimate_model(parts, _meta(1, 3, 4, 4))
    assert est["second"].input_bytes == (3 + 6) * 16 * 4  # image and f are both held
    assert est["second"].activation_sum_bytes == 6 * 16 * 4  # once, not five times
    totals = model_totals(est)
    assert totals["params_bytes"] == est["first"].params_bytes + est["second"].params_bytes
    assert totals["total_peak_bytes"] == totals["params_bytes"] + max(
        e.input_bytes + e.activation_peak_bytes for e in est.values())


def test_huge_resolution_costs_nothing_on_meta():
    net = nn.Sequential(*[nn.Conv2d(64 if i else 3, 64, 3, padding=1) for i in range(4)]).to("meta")
    est, _ = estimate_component(components_of(net)[0], {"image": _meta(1, 3, 3000, 3000)})
    assert est.activation_sum_bytes == 4 * 64 * 3000 * 3000 * 4  # 9.2 GB, not allocated
