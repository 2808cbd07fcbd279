"""PatchCore inference graph: chunked NN search, feature shapes, bank size, post-processing."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import types
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from visionscale import registry
from visionscale.anomaly import patchcore as pc
from visionscale.components import run_components

SRC = Path(__file__).resolve().parents[2] / "src"


def _brute_knn(q: torch.Tensor, b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cdist(q, b).topk(k, dim=1, largest=False)


class _AllocTracker(TorchDispatchMode):
    """Largest single new allocation and peak live bytes of tensors created inside the mode."""

    def __init__(self, external: list[torch.Tensor]):
        super().__init__()
        self.external = {t.untyped_storage()._cdata for t in external}
        self.refs: dict[int, list[int]] = {}
        self.live = self.peak = self.largest = 0

    def _release(self, key: int) -> None:
        entry = self.refs[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage()._cdata
            if key in self.external:
                continue  # a view of an input
            if key in self.refs:
                self.refs[key][1] += 1
            else:
                nbytes = t.untyped_storage().nbytes()
                self.refs[key] = [nbytes, 1]
                self.live += nbytes
                self.largest = max(self.largest, nbytes)
            weakref.finalize(t, self._release, key)
        self.peak = max(self.peak, self.live)
        return out


# ---------------------------------------------------------------------------------------
# nearest_neighbors


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("budget", [4096, 20_000, pc.DEFAULT_MAX_CHUNK_BYTES])
def test_nearest_neighbors_matches_cdist(k, budget):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(150, 16, generator=g, dtype=torch.float64)
    b = torch.randn(400, 16, generator=g, dtype=torch.float64)
    dist, idx = pc.nearest_neighbors(q, b, k=k, max_chunk_bytes=budget)
    ref_d, ref_i = _brute_knn(q, b, k)
    assert dist.shape == idx.shape == (150, k)
    assert idx.dtype == torch.int64
    torch.testing.assert_close(dist, ref_d, rtol=1e-9, atol=1e-9)
    assert torch.equal(idx, ref_i)


def test_tiny_budget_really_chunks_both_axes():
    q_rows, b_rows = pc.nn_chunk_sizes(150, 400, k=3, max_chunk_bytes=4096, element_size=8)
    assert q_rows < 150 and b_rows < 400  # many query chunks and many bank chunks
    assert math.ceil(150 / q_rows) * math.ceil(400 / b_rows) > 20
    assert pc.nn_step_bytes(q_rows, b_rows, 3, 8) <= 4096


def test_nearest_neighbors_float32_and_strided_queries():
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(2, 8, 5, 7, generator=g)  # (B, D, h, w)
    bank = torch.randn(300, 8, generator=g)
    queries = emb[1].flatten(1).T  # (35, 8) non-contiguous view, as MemoryBankSearch uses it
    assert not queries.is_contiguous()
    dist, idx = pc.nearest_neighbors(queries, bank, k=1, max_chunk_bytes=2048)
    ref_d, ref_i = _brute_knn(queries.contiguous(), bank, 1)
    torch.testing.assert_close(dist, ref_d, rtol=1e-4, atol=1e-4)
    assert torch.equal(idx, ref_i)


def test_k_larger_than_bank_is_clipped():
    q, b = torch.randn(5, 4), torch.randn(3, 4)
    dist, idx = pc.nearest_neighbors(q, b, k=9)
    assert dist.shape == (5, 3)
    assert torch.equal(idx.sort(dim=1).values, torch.arange(3).expand(5, 3))


@pytest.mark.parametrize(
    "nq,nb,k,budget,esize,dim",
    [(100, 500, 3, 8192, 8, 0), (1, 1, 1, 128, 4, 0), (5000, 70_000, 1, 2**20, 4, 1024), (64, 64, 9, 10**9, 4, 1536),
     (100, 500, 3, 8192, 8, 16)],
)
def test_chunk_sizes_respect_budget(nq, nb, k, budget, esize, dim):
    q_rows, b_rows = pc.nn_chunk_sizes(nq, nb, k, budget, esize, dim)
    assert 1 <= q_rows <= nq and 1 <= b_rows <= nb
    assert pc.nn_step_bytes(q_rows, b_rows, min(k, nb), esize, dim) <= budget


def test_chunk_sizes_prefer_whole_bank_then_chunk_it():
    # Whole bank fits next to >= 1024 query rows: one bank chunk.
    q_rows, b_rows = pc.nn_chunk_sizes(10_000, 1000, 1, 64 * 2**20, 4)
    assert b_rows == 1000 and q_rows >= 1024
    # PatchCore at 1024 px: 16384 queries x 327680 x 4 B = 21 GB as one matrix; chunked.
    q_rows, b_rows = pc.nn_chunk_sizes(128 * 128, 327_680, 1, pc.DEFAULT_MAX_CHUNK_BYTES, 4)
    assert q_rows * b_rows * 4 <= pc.DEFAULT_MAX_CHUNK_BYTES
    assert b_rows < 327_680


def test_budget_too_small_raises():
    with pytest.raises(ValueError, match="max_chunk_bytes"):
        pc.nn_chunk_sizes(10, 10, 1, max_chunk_bytes=8, element_size=4)


@pytest.mark.parametrize("k", [1, 3])
def test_search_allocations_respect_budget(k):
    """Every tensor the search allocates, and all of them alive at once, fit the budget
    (plus the (Q, k) results it accumulates and returns)."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(100, 16, generator=g)
    b = torch.randn(500, 16, generator=g)
    budget = 8192
    full_matrix = 100 * 500 * 4
    tracker = _AllocTracker([q, b])
    with tracker:
        dist, idx = pc.nearest_neighbors(q, b, k=k, max_chunk_bytes=budget)
    out_bytes = dist.numel() * 4 + idx.numel() * 8
    stats_bytes = (500 + 16) * 4  # the bank's centred norms (N,) and mean (D,), computed once per call
    assert tracker.largest <= budget < full_matrix
    assert tracker.peak <= budget + 2 * out_bytes + stats_bytes  # + chunk results and their concatenation
    ref_d, ref_i = _brute_knn(q, b, k)
    torch.testing.assert_close(dist, ref_d, rtol=1e-4, atol=1e-4)


def test_meta_search_allocates_like_the_real_one():
    """On meta the search skips the work of later query chunks but allocates the same."""
    stats = []
    for device in ("cpu", "meta"):
        q = torch.zeros(300, 16, device=device)
        b = torch.zeros(500, 16, device=device)
        tracker = _AllocTracker([q, b])
        with tracker:
            dist, idx = pc.nearest_neighbors(q, b, k=3, max_chunk_bytes=8192)
        assert dist.shape == idx.shape == (300, 3) and dist.device.type == device
        stats.append((tracker.largest, tracker.peak))
    assert stats[0] == stats[1]


def test_faiss_path_uses_index_and_returns_l2(monkeypatch):
    """With a stand-in faiss module (squared L2, like IndexFlatL2) the result is true L2."""
    calls = []

    class IndexFlatL2:
        def __init__(self, d):
            self.d = d

        def add(self, x):  # faiss appends: the bank may come in row chunks
            assert x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
            self.x = np.concatenate([self.x, x]) if hasattr(self, "x") else x

        def search(self, q, k):
            calls.append(k)
            d2 = ((q[:, None, :] - self.x[None]) ** 2).sum(-1)
            i = np.argsort(d2, axis=1)[:, :k]
            return np.take_along_axis(d2, i, 1).astype(np.float32), i.astype(np.int64)

    monkeypatch.setitem(sys.modules, "faiss", types.SimpleNamespace(IndexFlatL2=IndexFlatL2))
    q, b = torch.randn(20, 6), torch.randn(50, 6)
    dist, idx = pc.nearest_neighbors(q, b, k=2, use_faiss=True, max_chunk_bytes=400)  # bank added in 16-row chunks
    assert calls == [2, 2]  # queries searched in 16-row chunks too
    ref_d, ref_i = _brute_knn(q, b, 2)
    torch.testing.assert_close(dist, ref_d, rtol=1e-4, atol=1e-4)
    assert torch.equal(idx, ref_i)
    # meta tensors never go to faiss
    d, i = pc.nearest_neighbors(q.to("meta"), b.to("meta"), k=2, use_faiss=True)
    assert calls == [2, 2] and d.device.type == "meta" and d.shape == (20, 2)


def test_faiss_missing_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    q, b = torch.randn(7, 3), torch.randn(9, 3)
    dist, _ = pc.nearest_neighbors(q, b, use_faiss=True)
    torch.testing.assert_close(dist, _brute_knn(q, b, 1)[0], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------
# Eq. 7 image score


def test_reweighted_score_matches_hand_computation():
    g = torch.Generator().manual_seed(3)
    bank = torch.randn(40, 4, generator=g, dtype=torch.float64)
    emb = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    queries = emb.flatten(2).transpose(1, 2)  # (B, 9, D)
    d = torch.cdist(queries, bank.expand(2, -1, -1))  # (B, 9, N)
    patch_d, patch_i = d.min(dim=2)
    score = pc.reweighted_image_score(emb, patch_d, patch_i, bank, num_neighbors=5)
    for i in range(2):
        p = int(patch_d[i].argmax())
        s_star = float(patch_d[i, p])
        m_test = queries[i, p]
        m_star = bank[patch_i[i, p]]
        support = torch.cdist(m_star[None], bank)[0].topk(5, largest=False).indices
        assert int(patch_i[i, p]) in support.tolist()  # m* is its own neighbour
        denom = torch.exp(torch.linalg.vector_norm(m_test - bank[support], dim=1)).sum()
        expected = (1 - math.exp(float(torch.linalg.vector_norm(m_test - m_star))) / float(denom)) * s_star
        assert float(score[i]) == pytest.approx(expected, rel=1e-9)
        assert 0 < float(score[i]) < s_star
    plain = pc.reweighted_image_score(emb, patch_d, patch_i, bank, num_neighbors=1)
    torch.testing.assert_close(plain, patch_d.max(dim=1).values)


# ---------------------------------------------------------------------------------------
# Gaussian post-processing


def test_gaussian_kernel_size_and_sum():
    k = pc.gaussian_kernel1d(4.0)
    assert k.numel() == 2 * int(4 * 4 + 0.5) + 1 == 33
    assert float(k.sum()) == pytest.approx(1.0, abs=1e-6)
    assert int(k.argmax()) == 16 and torch.allclose(k, k.flip(0))


def test_blur_of_constant_is_constant():
    k = pc.gaussian_kernel1d(4.0)
    x = torch.full((2, 1, 40, 37), 3.5)
    y = pc.gaussian_blur(x, k)
    assert y.shape == x.shape
    torch.testing.assert_close(y, x)


def test_blur_matches_numpy_symmetric_reference():
    """scipy's default gaussian_filter: separable, borders mirrored with the edge repeated
    (numpy's ``symmetric`` pad). Written out in numpy here since scipy is not a dependency."""
    sigma = 2.0
    k = pc.gaussian_kernel1d(sigma).double()
    x = torch.rand(1, 1, 20, 23, dtype=torch.float64)
    y = pc.gaussian_blur(x, k)[0, 0].numpy()
    kn, r = k.numpy(), k.numel() // 2
    a = np.pad(x[0, 0].numpy(), r, mode="symmetric")
    a = np.apply_along_axis(lambda v: np.convolve(v, kn, mode="valid"), 1, a)
    a = np.apply_along_axis(lambda v: np.convolve(v, kn, mode="valid"), 0, a)
    np.testing.assert_allclose(y, a, rtol=1e-12, atol=1e-12)
    # an impulse far from the borders spreads into the outer product of the kernel
    imp = torch.zeros(1, 1, 21, 21, dtype=torch.float64)
    imp[0, 0, 10, 10] = 1
    torch.testing.assert_close(pc.gaussian_blur(imp, k)[0, 0, 2:19, 2:19], torch.outer(k, k))


# ---------------------------------------------------------------------------------------
# Model


def test_bank_size_formula():
    with torch.device("meta"):
        m = pc.patchcore(image_size=256)
        m512 = pc.patchcore(image_size=512, coreset_ratio=0.01, num_train_images=100)
    assert m.bank_size == round(0.1 * 200 * 32 * 32) == 20480
    assert m.bank_size_for(512) == 81920
    assert m512.bank_size == round(0.01 * 100 * 64 * 64) == 4096
    assert tuple(m.nn_search.memory_bank.shape) == (20480, 1024)
    assert m.feature_size((250, 256)) == (32, 32)  # ceil(H / 8): no divisibility needed


def test_embed_dims_1024_and_1536():
    with torch.device("meta"):
        reduced = pc.patchcore(image_size=256)
        full = pc.patchcore(image_size=256, embed_dim=None)
        wrn50 = pc.patchcore_wrn50(image_size=256)
    assert reduced.embed_dim == 1024 and full.embed_dim == 512 + 1024 == 1536
    x = torch.empty(1, 3, 256, 256, device="meta")
    assert reduced.feature_extractor(x).shape == (1, 1024, 32, 32)
    assert full.feature_extractor(x).shape == (1, 1536, 32, 32)
    assert wrn50.feature_extractor(x).shape == (1, 1024, 32, 32)
    assert full.nn_search.memory_bank.shape == (20480, 1536)


def test_backbone_keeps_only_stages_it_runs():
    with torch.device("meta"):
        m = pc.patchcore(image_size=256)
    names = {n.split(".")[0] for n, _ in m.feature_extractor.backbone.named_parameters()}
    assert "layer3" in names and "layer4" not in names and "fc" not in names


def test_channel_pool_matches_official_adaptive_pool1d():
    """Our channel pooling = the official per-position F.adaptive_avg_pool1d on (.., 1, C)."""
    x = torch.randn(2, 12, 3, 4)
    for out in (5, 12, 24):
        ours = pc._channel_pool(x, out)
        ref = F.adaptive_avg_pool1d(x.permute(0, 2, 3, 1).reshape(-1, 1, 12), out)
        ref = ref.reshape(2, 3, 4, out).permute(0, 3, 1, 2)
        torch.testing.assert_close(ours, ref)


def test_features_equal_official_unfold_when_dims_divide():
    """With pretrain_embed_dim dividing C, 3x3 avg pool + channel pooling equals the official
    unfold -> MeanMapper (adaptive pool over the flat (C, 3, 3) patch)."""
    torch.manual_seed(0)
    f = torch.randn(2, 8, 6, 5)
    ours = pc._channel_pool(F.avg_pool2d(f, 3, 1, 1, count_include_pad=True), 4)
    patches = F.unfold(f, 3, padding=1)  # (B, C*9, h*w), zero padded like the official code
    flat = patches.transpose(1, 2).reshape(-1, 1, 8 * 9)
    ref = F.adaptive_avg_pool1d(flat, 4).reshape(2, 6 * 5, 4).transpose(1, 2).reshape(2, 4, 6, 5)
    torch.testing.assert_close(ours, ref)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return pc.patchcore_tiny(image_size=64).eval()


def test_tiny_output_shapes(tiny):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = tiny(x)
    assert set(out) == {"anomaly_map", "pred_score"}
    assert out["anomaly_map"].shape == (2, 1, 64, 64)
    assert out["pred_score"].shape == (2,)
    assert tiny.nn_search.memory_bank.shape == (round(0.1 * 8 * 8 * 8), 32)
    assert torch.isfinite(out["anomaly_map"]).all() and (out["pred_score"] > 0).all()


def test_tiny_forward_equals_run_components(tiny):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = tiny(x)
        state = run_components(tiny.components(), x)
    assert [c.name for c in tiny.components()] == ["feature_extractor", "nn_search", "postprocess"]
    assert tiny.components()[1].module.memory_bank is tiny.nn_search.memory_bank
    assert torch.equal(out["anomaly_map"], state["anomaly_map"])
    assert torch.equal(out["pred_score"], state["pred_score"])
    assert state["embedding"].shape == (2, 32, 8, 8)
    assert state["patch_scores"].shape == (2, 1, 8, 8)


def test_tiny_patch_scores_are_nearest_bank_distances(tiny):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        state = run_components(tiny.components(), x)
    q = state["embedding"][0].flatten(1).T  # (64, 32)
    ref = torch.cdist(q, tiny.nn_search.memory_bank).min(dim=1).values
    torch.testing.assert_close(state["patch_scores"].flatten(), ref, rtol=1e-4, atol=1e-4)
    # a bank that contains the test patches scores them 0 everywhere
    m = pc.patchcore_tiny(image_size=64).eval()
    m.load_state_dict(tiny.state_dict())
    m.set_memory_bank(q)
    with torch.no_grad():
        out = m(x)
    assert float(out["anomaly_map"].abs().max()) < 1e-2
    with pytest.raises(ValueError, match="memory bank"):
        m.set_memory_bank(torch.randn(5, 7))


def test_tiny_non_multiple_of_8_size(tiny):
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        state = run_components(tiny.components(), x)
    assert state["embedding"].shape[-2:] == tiny.feature_size((70, 90)) == (9, 12)
    assert state["anomaly_map"].shape == (1, 1, 70, 90)


def test_validate_input_size(tiny):
    tiny.validate_input_size(32, 40)
    with pytest.raises(ValueError, match="at least|>= 32"):
        tiny.validate_input_size(31, 64)
    with pytest.raises(ValueError, match="got 16x64"):
        tiny(torch.randn(1, 3, 16, 64))


def test_real_patchcore_on_meta_at_1024_is_fast():
    t0 = time.perf_counter()
    with torch.device("meta"):
        m = pc.patchcore(image_size=1024).eval()
    assert m.bank_size == round(0.1 * 200 * 128 * 128)
    x = torch.empty(1, 3, 1024, 1024, device="meta")
    with torch.no_grad():
        out = m(x)
        state = run_components(m.components(), x)
    assert out["anomaly_map"].shape == (1, 1, 1024, 1024) and out["anomaly_map"].device.type == "meta"
    assert out["pred_score"].shape == (1,)
    assert state["embedding"].shape == (1, 1024, 128, 128)
    assert time.perf_counter() - t0 < 10


def test_registered():
    for name, fn in [("patchcore", pc.patchcore), ("patchcore_wrn50", pc.patchcore_wrn50),
                     ("patchcore_tiny", pc.patchcore_tiny)]:
        assert registry._REGISTRY[name] is fn
    with torch.device("meta"):
        m = pc.patchcore_wrn50(image_size=(256, 320), num_neighbors=3)
    assert m.config.backbone == "wide_resnet50_2" and m.config.image_size == (256, 320)
    assert m.bank_size == round(0.1 * 200 * 32 * 40)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="backbone"):
        pc.PatchCoreConfig(backbone="vgg16")
    with pytest.raises(ValueError, match="coreset_ratio"):
        pc.PatchCoreConfig(coreset_ratio=0)
    with pytest.raises(ValueError, match="patch_size"):
        pc.PatchCoreConfig(patch_size=2)


def test_model_module_imports_no_cli_or_plotting():
    code = (
        "import sys; import visionscale.anomaly.patchcore\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('typer', 'matplotlib', 'rich', 'click', 'faiss')"
        " or m.startswith('visionscale.') and (m.startswith('visionscale.cli') or 'train' in m)]\n"
        "assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
