"""Anomaly preprocessing with 16-bit files and parallel reading: precision reaches the model,
8-bit files give the tensors they always gave, and workers change nothing but speed."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image

from visionscale.anomaly import data as D
from visionscale.errors import InvalidValueError
from visionscale.io.images import read_image_and_size
from visionscale.modelinfo import IMAGENET_MEAN, IMAGENET_STD

pytestmark = pytest.mark.usefixtures("one_thread")


def _old_model_input(path, size):
    """What read_for_size + to_model_input computed before 16-bit support (uint8 only)."""
    h, w = D.pair(size)
    image = read_image_and_size(path, min_size=(D.READ_MARGIN * h, D.READ_MARGIN * w))[0]
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0).float().div_(255)
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std)[0]


def test_uint8_and_float_inputs_give_bit_identical_tensors():
    # Every 8-bit value, with and without a resize: u8 / 255 in float32 is torch's u8.float() / 255.
    levels = np.arange(256, dtype=np.uint8)
    img = np.stack(np.meshgrid(levels, levels[::-1], indexing="ij"), axis=-1)[..., [0, 1, 0]]  # (256, 256, 3)
    for size in (256, 64, (40, 72)):
        a = D.to_model_input(img, size)
        b = D.to_model_input(img.astype(np.float32) / np.float32(255), size)
        assert torch.equal(a, b)


def test_eight_bit_files_reach_the_model_as_before(brick_demo, tmp_path):
    ds = D.load_dataset(brick_demo)
    samples = ds.train[:3] + ds.test[:2]
    Image.fromarray(np.asarray(Image.open(samples[0].path).convert("L"))).save(tmp_path / "gray.png")
    samples.append(D.Sample(tmp_path / "gray.png", 0))
    for size in (64, 16, (24, 40)):
        arr, _ = D.read_for_size(samples[0].path, size)
        assert arr.dtype == np.uint8  # 8-bit files stay 8-bit in memory
        batches = list(D.iter_batches(samples, size, 4))
        got = torch.cat([b.images for b in batches])
        want = torch.stack([_old_model_input(s.path, size) for s in samples])
        assert torch.equal(got, want)


def test_sixteen_bit_precision_reaches_the_model(tmp_path):
    # Two 16-bit images that differ only below the 8-bit step: the old reader could not tell them apart.
    rng = np.random.default_rng(0)
    a = rng.integers(20000, 40000, (32, 32), dtype=np.uint16)
    b = a + rng.integers(1, 100, a.shape).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", np.dstack([a] * 3), photometric="rgb")
    Image.fromarray(b).save(tmp_path / "b.png")
    arr, size = D.read_for_size(tmp_path / "a.tif", 32)
    assert arr.dtype == np.float32 and size == (32, 32)
    xa = D.to_model_input(arr, 32)
    xb = D.to_model_input(D.read_for_size(tmp_path / "b.png", 32)[0], 32)
    expected = (torch.from_numpy(a / 65535.0).float()[None] - torch.tensor(IMAGENET_MEAN)[:, None, None]) \
        / torch.tensor(IMAGENET_STD)[:, None, None]
    # float32 all the way: a few ulps of values of magnitude ~2 (ulp 2.4e-7)
    torch.testing.assert_close(xa, expected, rtol=0, atol=2e-6)
    diff = (xb - xa)[0] * IMAGENET_STD[0]  # back in [0, 1] units
    torch.testing.assert_close(diff, torch.from_numpy((b.astype(np.float64) - a) / 65535).float(), rtol=0, atol=2e-6)
    old_a, old_b = _old_model_input(tmp_path / "a.tif", 32), _old_model_input(tmp_path / "b.png", 32)
    assert (old_a != old_b).float().mean() < (xa != xb).float().mean()  # the 8-bit path lost most differences
    assert (xa != xb).all()


def test_white_level_passes_through_iter_batches(tmp_path):
    tifffile.imwrite(tmp_path / "t.tif", np.full((8, 8), 4095, np.uint16))
    (batch,) = D.iter_batches([D.Sample(tmp_path / "t.tif", 0)], 8, 1, white_level=4095)
    white = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(batch.images[0, :, 0, 0], white, rtol=0, atol=1e-6)


def test_sixteen_bit_mask_marks_values_above_half_range(tmp_path):
    m = np.zeros((8, 8), np.uint16)
    m[0, 0], m[0, 1], m[0, 2] = 32767, 32768, 65535
    Image.fromarray(m).save(tmp_path / "m.png")
    t = D.load_mask(tmp_path / "m.png", 8)
    assert t.dtype == torch.bool and t.sum() == 2 and t[0, 1] and t[0, 2] and not t[0, 0]


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_give_the_same_batches_log_and_errors(brick_demo, tmp_path, workers):
    ds = D.load_dataset(brick_demo)
    samples = list(ds.test)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    samples.insert(2, D.Sample(tmp_path / "bad.png", 0))
    with pytest.raises(D.DataError, match=r"bad\.png.*skip_bad"):
        list(D.iter_batches(samples, 32, 2, workers=workers))
    ref_log, par_log = D.ReadLog(), D.ReadLog()
    ref = list(D.iter_batches(samples, 32, 2, skip_bad=True, log=ref_log, with_masks=True))
    par = list(D.iter_batches(iter(samples), 32, 2, skip_bad=True, log=par_log, with_masks=True, workers=workers))
    assert [b.samples for b in par] == [b.samples for b in ref]
    for p, r in zip(par, ref):
        assert torch.equal(p.images, r.images) and torch.equal(p.masks, r.masks)
    assert par_log.bad == ref_log.bad and [p for p, _ in par_log.bad] == [tmp_path / "bad.png"]
    assert par_log.sizes == ref_log.sizes


def test_bad_inputs():
    with pytest.raises(InvalidValueError, match="image"):
        D.to_model_input(np.zeros((4, 4, 3), np.uint16), 4)
    with pytest.raises(InvalidValueError, match="workers"):
        list(D.iter_batches([], 4, 1, workers=-1))
