"""The memory-budget planner (visionscale.study.tiles) on tiny conv nets: every plan is checked
against direct tile_need_bytes calls, and one need against a hand count."""

import pytest
import torch
from torch import nn

from visionscale.errors import InvalidValueError, VisionscaleError
from visionscale.modelinfo import ModelInfo
from visionscale.study.memory import to_meta
from visionscale.study.tiles import (BudgetTooSmallError, TilePlan, parse_budget, plan_tiles, square_tiles,
                                     tile_need_bytes)
from visionscale.tiling import default_overlap, tile_count

MiB = 1024**2


def net(info: ModelInfo | None = None) -> nn.Module:
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
    if info is not None:
        m.model_info = info
    return m


def test_need_of_a_one_by_one_conv_by_hand():
    conv = nn.Conv2d(3, 4, 1)
    # params (3*4 weights + 4 biases) + input (3 channels) + output (4 channels), fp32, per tile
    for (h, w), b in (((32, 48), 1), ((64, 64), 3)):
        assert tile_need_bytes(conv, (h, w), batch=b) == (12 + 4) * 4 + b * (3 + 4) * h * w * 4
    assert tile_need_bytes(conv, 64, dtype=torch.float16) * 2 == tile_need_bytes(conv, 64)


def test_chosen_tile_fits_and_the_next_step_does_not():
    m = net()
    plan = plan_tiles(m, 16 * MiB)
    assert isinstance(plan, TilePlan) and plan.tile[0] == plan.tile[1] and plan.tile[0] % 32 == 0
    assert plan.usable_bytes == int(16 * MiB * 0.75)
    assert plan.need_bytes == tile_need_bytes(m, plan.tile, plan.batch) <= plan.usable_bytes
    assert tile_need_bytes(m, plan.tile[0] + 32) > plan.usable_bytes
    # the tile was chosen at batch 1; here two tiles of that size do not fit, so the batch is 1
    assert plan.batch == 1 and tile_need_bytes(m, plan.tile, 2) > plan.usable_bytes
    assert next(m.parameters()).device.type == "cpu"  # the caller's module is not moved


def test_batch_is_the_largest_that_fits_at_the_tile():
    m = net()
    plan = plan_tiles(m, 16 * MiB, image_size=(96, 128))  # the image caps the tile, memory is left
    assert plan.tile == (96, 128)
    assert 1 < plan.batch < 16
    assert tile_need_bytes(m, plan.tile, plan.batch) <= plan.usable_bytes < tile_need_bytes(m, plan.tile, plan.batch + 1)
    assert plan_tiles(m, 16 * MiB, image_size=(96, 128), max_batch=2).batch == 2
    fixed = plan_tiles(m, 16 * MiB, tile=(64, 64))
    assert fixed.tile == (64, 64) and fixed.batch == 16  # 16 tiles of 64 px are ~9 MiB: max_batch caps
    assert plan_tiles(m, 16 * MiB, batch=4).batch == 4


def test_overhead_and_safety_come_off_the_budget():
    m = net()
    free = plan_tiles(m, 16 * MiB)
    loaded = plan_tiles(m, 16 * MiB, overhead_bytes=6 * MiB)
    assert loaded.usable_bytes == free.usable_bytes - 6 * MiB
    assert loaded.tile[0] < free.tile[0]
    assert tile_need_bytes(m, loaded.tile) <= loaded.usable_bytes < tile_need_bytes(m, loaded.tile[0] + 32)
    careless = plan_tiles(m, 16 * MiB, safety=0.0)
    assert careless.usable_bytes == 16 * MiB and careless.tile[0] > free.tile[0]


def test_too_small_a_budget_names_the_minimum():
    m = net()
    with pytest.raises(BudgetTooSmallError) as info:
        plan_tiles(m, 100_000)
    err = info.value
    assert isinstance(err, VisionscaleError) and isinstance(err, ValueError) and err.fields == ("memory_budget",)
    assert "the smallest useful tile (64x64) needs at least" in str(err) and "25% safety" in str(err)
    need = tile_need_bytes(m, 64)
    assert err.min_budget_bytes * 0.75 >= need  # the minimum really is enough...
    assert plan_tiles(m, err.min_budget_bytes).tile == (64, 64)
    with pytest.raises(BudgetTooSmallError):  # ...and it is the minimum
        plan_tiles(m, err.min_budget_bytes - 1)
    with pytest.raises(BudgetTooSmallError, match="1,024 bytes of overhead") as info:
        plan_tiles(m, err.min_budget_bytes, overhead_bytes=1024)
    assert info.value.min_budget_bytes > err.min_budget_bytes
    with pytest.raises(BudgetTooSmallError, match=r"a tile \(512x512\) needs .*smallest useful tile \(64x64\)"):
        plan_tiles(m, err.min_budget_bytes, tile=512)


def test_image_smaller_than_the_largest_tile_caps_it():
    m = net()
    assert plan_tiles(m, 1024 * MiB, image_size=(40, 50)).tile == (40, 50)  # below min_tile: the image itself
    plan = plan_tiles(m, 64 * MiB, image_size=(300, 5000), batch=1)
    assert plan.tile[0] == 300 and plan.tile[1] % 32 == 0  # whole height, a tile side along the width
    assert tile_need_bytes(m, plan.tile) <= plan.usable_bytes < tile_need_bytes(m, (300, plan.tile[1] + 32))


def test_step_follows_the_model_stride_and_min_tile_its_margin():
    m = net(ModelInfo(tile_align=48))
    plan = plan_tiles(m, 16 * MiB)
    assert plan.tile[0] % 96 == 0 and plan.align == 48  # lcm(48, 32)
    assert tile_need_bytes(m, plan.tile[0] + 96) > plan.usable_bytes
    # margin 40: a 64 px tile cannot overlap by 2 x 40 px; the smallest useful tile is 96 px
    assert default_overlap(64, 40) < 80 <= default_overlap(96, 40)
    with pytest.raises(BudgetTooSmallError, match=r"smallest useful tile \(96x96\)"):
        plan_tiles(net(ModelInfo(tile_margin=40)), 100_000)
    t = plan_tiles(net(ModelInfo(tile_margin=4, tile_align=8)), 16 * MiB).tiling()
    assert t.overlap == (default_overlap(t.tile[0], 4, 8),) * 2 and t.margin == 4 and t.align == 8


def test_a_factory_is_built_per_tile_and_rejected_sizes_do_not_fit():
    seen = []

    class Upto160(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def validate_input_size(self, h, w):
            if max(h, w) > 160:
                raise ValueError("at most 160 px")

        def forward(self, x):
            return self.conv(x)

    def build(side):
        seen.append(side)
        assert torch.empty(0).device.type == "meta"  # built on meta
        return Upto160()

    plan = plan_tiles(build, 1024 * MiB)
    assert plan.tile == (160, 160) and 160 in seen
    with pytest.raises(InvalidValueError, match="cannot run on a 192x192 tile: at most 160 px"):
        tile_need_bytes(build, 192)


def test_a_model_with_a_minimum_size_starts_there():
    class AtLeast128(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def validate_input_size(self, h, w):
            if min(h, w) < 128:
                raise ValueError("needs 128 px")

        def forward(self, x):
            return self.conv(x)

    m = AtLeast128()
    with pytest.raises(BudgetTooSmallError, match=r"smallest useful tile \(128x128\)") as info:
        plan_tiles(m, 100_000)
    assert plan_tiles(m, info.value.min_budget_bytes).tile == (128, 128)
    with pytest.raises(InvalidValueError, match="needs 128 px; no tile side") as info:
        plan_tiles(m, 1024 * MiB, max_tile=96)
    assert info.value.fields == ("min_tile", "step")


def test_bad_arguments():
    m = net()
    for kw, field in ((dict(safety=1.0), "safety"), (dict(max_batch=0), "max_batch"), (dict(min_tile=0), "min_tile"),
                      (dict(overhead_bytes=-1), "overhead_bytes"), (dict(max_tile=32), "max_tile")):
        with pytest.raises(InvalidValueError) as info:
            plan_tiles(m, 16 * MiB, **kw)
        assert info.value.fields[0] == field
    with pytest.raises(InvalidValueError, match="memory_budget"):
        plan_tiles(m, 0)


def test_parse_budget():
    assert parse_budget("2GiB") == 2 * 1024**3
    assert parse_budget("512MiB") == 512 * MiB
    assert parse_budget("4GB") == 4 * 1000**3
    assert parse_budget(12345) == 12345
    for bad in ("lots", "2 GiB of RAM", "0MiB", -5, ""):
        with pytest.raises(InvalidValueError) as info:
            parse_budget(bad)
        assert info.value.fields == ("memory_budget",)


def test_square_tiles():
    assert square_tiles(2236, 4096) == (2236, 0, 1)
    tile, overlap, n = square_tiles(3464, 1024, margin=8, align=16)
    assert (tile, overlap) == (1024, default_overlap(1024, 8, 16))
    assert n == tile_count(3464, 3464, (1024, 1024), (overlap, overlap), 16) and n > 9  # 4 per axis at least


def test_to_meta_leaves_the_module_and_copies_no_data():
    m = net()
    m.register_buffer("bank", torch.ones(1000, 64))
    copy = to_meta(m, torch.float16)
    assert all(t.device.type == "meta" and t.dtype == torch.float16 for t in copy.state_dict().values())
    assert m.bank.device.type == "cpu" and m.bank.dtype == torch.float32 and bool((m.bank == 1).all())
    assert copy[0].weight.shape == m[0].weight.shape and not copy.training


def test_a_factory_that_refuses_small_sizes_is_planned_from_where_it_builds():
    def build(side):
        if side < 100:
            raise ValueError("image_size must be >= 100")
        return nn.Conv2d(3, 4, 3, padding=1)

    assert plan_tiles(build, 1024 * MiB, max_tile=512).tile == (512, 512)
    with pytest.raises(BudgetTooSmallError, match=r"smallest useful tile \(128x128\)"):
        plan_tiles(build, 100_000)
    with pytest.raises(InvalidValueError, match="cannot be built for a 64x64 tile: image_size must be >= 100") as info:
        tile_need_bytes(build, 64)
    assert info.value.fields == ("tile",)
