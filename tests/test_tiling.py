"""Tile geometry and stitching (visionscale.tiling)."""

import numpy as np
import pytest

from visionscale.errors import InvalidValueError
from visionscale.tiling import Stitcher, Tiling, axis_weights, default_overlap, parse_tile, tile_count, tile_grid, tile_starts


@pytest.mark.parametrize("length,tile,overlap,align", [(1000, 256, 32, 8), (257, 256, 0, 1), (4096, 512, 64, 4),
                                                       (999, 100, 99, 1), (64, 256, 16, 8)])
def test_tiles_cover_the_axis_and_stay_inside(length, tile, overlap, align):
    starts = tile_starts(length, tile, overlap, align)
    t = min(tile, length)
    assert starts[0] == 0 and starts[-1] + t == length
    assert all(0 <= s <= length - t for s in starts)
    assert all(b - a <= t for a, b in zip(starts, starts[1:]))  # no gap between neighbours
    assert all(s % align == 0 for s in starts[:-1])  # every tile but the edge-aligned last one is aligned


def test_tile_larger_than_image_is_the_image():
    g = tile_grid(100, 300, (256, 256))
    assert g.tile == (100, 256) and g.shrunk and len(g) == 2


def test_parse_tile_forms_and_errors():
    assert parse_tile("640x480") == (480, 640)
    assert parse_tile(512) == (512, 512)
    assert parse_tile((300, 400)) == (300, 400)
    for bad in ("0", "axb", "1x2x3", -4):
        with pytest.raises(InvalidValueError):
            parse_tile(bad)


def test_overlap_must_be_smaller_than_tile():
    with pytest.raises(InvalidValueError, match="tile_overlap"):
        Tiling((64, 64), (64, 0))
    assert Tiling.from_dict(Tiling((64, 32), (8, 4), 2, 4, (500, 600)).as_dict()) == Tiling((64, 32), (8, 4), 2, 4,
                                                                                             (500, 600))


def test_weights_zero_in_margin_one_past_ramp():
    w = axis_weights(start=100, size=64, length=400, margin=4, overlap=16)
    assert w.dtype == np.float32 and (w[:4] == 0).all() and (w[-4:] == 0).all()
    assert (w[4 + 8 : -(4 + 8)] == 1).all()  # past margin + ramp (16 - 2*4 = 8)
    edge = axis_weights(start=0, size=64, length=400, margin=4, overlap=16)
    assert edge[0] == 1  # the image border has no falloff


def test_stitching_a_cropped_map_gives_it_back():
    """Tiles cut from one map and stitched again equal it (weights sum to one everywhere)."""
    full = np.random.default_rng(0).random((300, 500), dtype=np.float32)
    grid = tile_grid(300, 500, (128, 128), (40, 40), 4)
    st = Stitcher(300, 500, margin=8, overlap=(40, 40))
    for y0, x0, y1, x1 in grid.boxes:
        st.add(full[y0:y1, x0:x1], (y0, x0, y1, x1))
    # float32 weighted mean of identical values: error is a few ulps of values in [0, 1).
    np.testing.assert_allclose(st.result(), full, rtol=0, atol=1e-6)


def test_margin_values_never_reach_the_result():
    """Values within the margin of an interior edge are garbage; they must not leak into the map."""
    full = np.zeros((200, 200), dtype=np.float32)
    grid = tile_grid(200, 200, (96, 96), (32, 32), 1)
    st = Stitcher(200, 200, margin=16, overlap=(32, 32))
    for y0, x0, y1, x1 in grid.boxes:
        t = full[y0:y1, x0:x1].copy()
        m = 16
        if y0 > 0:
            t[:m] = 1e6
        if x0 > 0:
            t[:, :m] = 1e6
        if y1 < 200:
            t[-m:] = 1e6
        if x1 < 200:
            t[:, -m:] = 1e6
        st.add(t, (y0, x0, y1, x1))
    assert np.abs(st.result()).max() == 0


def test_too_small_overlap_is_an_error():
    grid = tile_grid(200, 200, (100, 100), (4, 4), 1)
    st = Stitcher(200, 200, margin=8, overlap=(4, 4))
    for b in grid.boxes:
        st.add(np.zeros((100, 100), dtype=np.float32), b)
    with pytest.raises(InvalidValueError, match="2 x the model's margin"):
        st.result()


def test_tile_count_and_default_overlap():
    assert tile_count(4096, 4096, (512, 512), (0, 0)) == 64
    ov = default_overlap(256, 16, 4)
    assert ov % 4 == 0 and 32 <= ov < 256
