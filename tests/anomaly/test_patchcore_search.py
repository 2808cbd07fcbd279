"""PatchCore's nearest-neighbour search: accuracy against float64, and the measured choice of backend."""

from __future__ import annotations

import copy
import pickle
import sys
import warnings

import pytest
import torch

from visionscale.anomaly import patchcore as pc
from visionscale.anomaly.runs import build_patchcore
from visionscale.errors import InvalidValueError

# The target: distances within 1e-4 (absolute) of a float64 reference.
TARGET = 1e-4


def _wrn_like(num_bank: int, num_queries: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (N, D) bank and (Q, D) queries shaped like WRN patch features.

    A common positive offset with ||offset||^2 = 700 (as WRN-50 features have), bank rows
    spread around it (pairwise distances ~0.05 * sqrt(2 D)), and every query a bank row
    moved by 0.2 to 0.5: nearest-neighbour distances of 0.2-0.5, as on nominal patches.
    """
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(dim, generator=g, dtype=torch.float64) + 0.3
    mu *= (700 / mu.square().sum()).sqrt()
    bank = mu + 0.05 * torch.randn(num_bank, dim, generator=g, dtype=torch.float64)
    step = torch.randn(num_queries, dim, generator=g, dtype=torch.float64)
    radius = 0.2 + 0.3 * torch.rand(num_queries, 1, generator=g, dtype=torch.float64)
    queries = bank[torch.randint(0, num_bank, (num_queries,), generator=g)] + step / step.norm(dim=1, keepdim=True) * radius
    return bank.float(), queries.float()


def _reference(queries: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k-NN of the float32 inputs computed in float64."""
    return torch.cdist(queries.double(), bank.double()).topk(k, dim=1, largest=False)


@pytest.fixture(scope="module")
def offset_data():
    bank, queries = _wrn_like(2048, 256, 512)
    return bank, queries


def test_test_data_defeat_the_plain_expansion(offset_data):
    """The points are hard: ||q||^2 ~ 700, and the uncentred float32 expansion (the search
    before centring, and faiss's) misses the float64 distances by more than the target."""
    bank, queries = offset_data
    assert 650 < float(queries.square().sum(1).mean()) < 750
    ref_d, _ = _reference(queries, bank, 1)
    assert 0.15 < float(ref_d.min()) and float(ref_d.max()) < 0.5
    plain = (queries.square().sum(1, keepdim=True) - 2 * queries @ bank.T + bank.square().sum(1)).clamp_min(0)
    assert float((plain.min(dim=1).values.sqrt().double() - ref_d[:, 0]).abs().max()) > TARGET


@pytest.mark.parametrize("k", [1, 9])
@pytest.mark.parametrize("refine", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_distances_match_float64_reference(offset_data, k, refine, layout):
    # Tolerance: 1e-4 absolute is the target. Measured on these points: the centred
    # ranking is within ~1e-5, the refined distances within ~1e-7 (float32 rounding of
    # distances below 3), the uncentred expansion off by more than 1e-4 (test above).
    bank, queries = offset_data
    if layout == "strided":  # (h*w, D) view of a (D, h, w) map, as MemoryBankSearch passes it
        queries = queries.T.contiguous().view(queries.shape[1], 16, 16).flatten(1).T
        assert not queries.is_contiguous()
    ref_d, ref_i = _reference(queries, bank, k)
    dist, idx = pc.nearest_neighbors(queries, bank, k, max_chunk_bytes=2**20, refine=refine)  # several chunks
    assert (dist.double() - ref_d).abs().max() <= TARGET
    assert torch.equal(idx, ref_i)
    if refine:  # differences instead of the expansion: float32 rounding only (~1e-7 here)
        assert (dist.double() - ref_d).abs().max() <= 1e-6


def test_faiss_search_is_centred_and_refined(offset_data):
    pytest.importorskip("faiss")
    bank, queries = offset_data
    ref_d, ref_i = _reference(queries, bank, 9)
    dist, idx = pc.nearest_neighbors(queries, bank, 9, use_faiss=True)
    assert (dist.double() - ref_d).abs().max() <= 1e-6  # refined like the torch search (see above)
    assert torch.equal(idx, ref_i)
    raw, _ = pc.nearest_neighbors(queries, bank, 9, use_faiss=True, refine=False)
    assert (raw.double() - ref_d).abs().max() <= TARGET  # faiss's own expansion, on centred data


def test_bank_stats_are_centred_norms(offset_data):
    bank, _ = offset_data
    stats = pc.bank_stats(bank, max_chunk_bytes=100_000)  # several row chunks
    mean64 = bank.double().mean(0)
    # float32 mean of 2048 values ~1.2: rounding far below 1e-5 of them.
    torch.testing.assert_close(stats.mean.double(), mean64, rtol=0, atol=1e-5)
    sq64 = (bank.double() - stats.mean.double()).square().sum(1)
    torch.testing.assert_close(stats.sq.double(), sq64, rtol=1e-5, atol=0)  # float32 sums of positive terms


def test_image_score_and_patch_scores_match_float64(offset_data):
    """MemoryBankSearch end to end on offset features: patch scores and the Eq. 7 score."""
    bank, queries = offset_data
    dim = bank.shape[1]
    emb = queries[:128].T.reshape(1, dim, 8, 16).repeat(2, 1, 1, 1)  # (B, D, h, w)
    emb[1] = queries[128:].T.reshape(dim, 8, 16)
    search = pc.MemoryBankSearch(1, dim, num_neighbors=9, search="torch")
    search.memory_bank = bank
    patch, score = search(emb)
    flat = emb.flatten(2).transpose(1, 2).double()  # (B, h*w, D)
    ref_d, ref_i = _reference(flat.reshape(-1, dim), bank, 1)
    assert (patch.flatten().double() - ref_d[:, 0]).abs().max() <= 1e-6  # refined distances, see above
    ref_score = pc.reweighted_image_score(emb.double(), ref_d[:, 0].view(2, -1), ref_i[:, 0].view(2, -1),
                                          bank.double(), num_neighbors=9)
    # Scores ~0.5 built from refined distances: float32 rounding, far below the 1e-4 target.
    assert (score.double() - ref_score).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------
# Memory: the centred query chunk is counted, the meta path still works


def test_step_bytes_count_the_centred_queries():
    without = pc.nn_step_bytes(100, 500, 1, 4)
    assert pc.nn_step_bytes(100, 500, 1, 4, dim=64) == without + 100 * 64 * 4
    q_rows, b_rows = pc.nn_chunk_sizes(5000, 20_000, 1, 2**24, 4, dim=1536)
    assert pc.nn_step_bytes(q_rows, b_rows, 1, 4, 1536) <= 2**24 < pc.nn_step_bytes(q_rows + 1, b_rows, 1, 4, 1536)


def test_search_runs_on_meta():
    with torch.device("meta"):
        m = pc.patchcore_tiny(image_size=64).eval()
    with torch.no_grad():
        out = m(torch.empty(2, 3, 64, 64, device="meta"))
    assert out["anomaly_map"].shape == (2, 1, 64, 64) and out["pred_score"].device.type == "meta"
    choice = m.nn_search.search_choice
    assert choice["backend"] == "torch" and "meta" in choice["reason"] and choice["probe_ms"] == {}


# ---------------------------------------------------------------------------------------
# Choosing the backend by measurement (fake backends and a fake clock: no timing asserts)


class _Clock:
    """A timer that advances only when a fake backend "runs"."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _fakes(clock: _Clock, seconds: dict[str, float], calls: dict[str, list[int]]):
    def make(name):
        def run(q):
            calls.setdefault(name, []).append(q.shape[0])
            clock.now += seconds[name]

        return run

    return {name: make(name) for name in seconds}


@pytest.mark.parametrize("faster", ["torch", "faiss"])
def test_choose_search_keeps_the_faster(faster):
    clock, calls = _Clock(), {}
    seconds = {"torch": 0.3, "faiss": 0.2} if faster == "faiss" else {"torch": 0.2, "faiss": 0.3}
    bank, sample = torch.zeros(50, 4), torch.zeros(256, 4)
    choice = pc.choose_search(bank, sample, backends=_fakes(clock, seconds, calls), timer=clock, repeats=2)
    assert choice["backend"] == faster
    assert choice["probe_ms"] == pytest.approx({n: s * 1000 for n, s in seconds.items()})
    assert choice["probe_rows"] == 256 and "256 query rows" in choice["reason"]
    # one untimed warm-up on a few rows, then two timed runs on the whole sample
    assert calls == {n: [pc._WARMUP_ROWS, 256, 256] for n in seconds}


def test_choose_search_ties_go_to_torch_and_slow_backends_run_once():
    clock, calls = _Clock(), {}
    bank, sample = torch.zeros(50, 4), torch.zeros(64, 4)
    tie = pc.choose_search(bank, sample, backends=_fakes(clock, {"torch": 0.1, "faiss": 0.1}, calls), timer=clock)
    assert tie["backend"] == "torch"
    calls.clear()
    slow = pc.choose_search(bank, sample, backends=_fakes(clock, {"torch": 0.1, "faiss": 0.5}, calls), timer=clock,
                            repeats=3)
    assert slow["backend"] == "torch"
    assert len(calls["torch"]) == 1 + 3 and len(calls["faiss"]) == 1 + 1  # > 2x the best: not repeated


def test_choose_search_device_and_install_rules(monkeypatch):
    sample = torch.zeros(8, 4)
    meta = pc.choose_search(torch.zeros(50, 4, device="meta"), sample.to("meta"))
    assert meta["backend"] == "torch" and "meta" in meta["reason"] and meta["probe_ms"] == {}
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    assert not pc.faiss_installed()
    missing = pc.choose_search(torch.zeros(50, 4), sample)
    assert missing["backend"] == "torch" and "not installed" in missing["reason"]
    with pytest.raises(ValueError, match="repeats"):
        pc.choose_search(torch.zeros(50, 4), sample, repeats=0)


def test_default_probe_times_both_real_backends():
    pytest.importorskip("faiss")
    bank, queries = _wrn_like(300, 40, 32)
    choice = pc.choose_search(bank, queries, repeats=1)
    assert choice["backend"] in ("torch", "faiss")
    assert set(choice["probe_ms"]) == {"torch", "faiss"} and all(v > 0 for v in choice["probe_ms"].values())


def test_auto_probes_once_per_bank_and_stashes_the_choice(monkeypatch):
    made = []

    def fake_choose(bank, sample, k=1, **kw):
        made.append((bank.shape[0], sample.shape[0]))
        return pc._choice("torch", "fake probe", {"torch": 1.0, "faiss": 2.0}, sample.shape[0])

    monkeypatch.setattr(pc, "choose_search", fake_choose)
    torch.manual_seed(0)
    m = pc.patchcore_tiny(image_size=64).eval()
    m.nn_search.probe_rows = 10
    assert m.config.search == "auto" and m.nn_search.search_choice is None
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        m(x)
        m(x)
    assert made == [(m.bank_size, 10)]  # the first image's first 10 patches, once
    assert m.nn_search.search_choice == {"search": "auto", "backend": "torch", "reason": "fake probe",
                                         "probe_ms": {"torch": 1.0, "faiss": 2.0}, "probe_rows": 10}
    m.set_memory_bank(torch.randn(30, m.embed_dim))
    assert m.nn_search.search_choice is None
    with torch.no_grad():
        m(x)
    assert made[-1] == (30, 10)  # a new bank is probed again
    assert m.nn_search.choose()["probe_rows"] == 10 and made[-1] == (30, 10)  # eager, bank rows stand in


def test_forced_search_and_the_deprecated_flag(monkeypatch):
    monkeypatch.setattr(pc, "choose_search", lambda *a, **k: pytest.fail("forced searches are not probed"))
    m = pc.patchcore_tiny(image_size=64, search="torch").eval()
    with torch.no_grad():
        m(torch.randn(1, 3, 64, 64))
    assert m.nn_search.search_choice["backend"] == "torch" and not m.nn_search.use_faiss
    with pytest.warns(DeprecationWarning, match="use_faiss"):
        cfg = pc.PatchCoreConfig(use_faiss=False)
    assert cfg.search == "torch" and cfg.use_faiss is None
    with pytest.raises(InvalidValueError, match="contradicts") as info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            pc.PatchCoreConfig(search="faiss", use_faiss=False)
    assert info.value.fields == ("search", "use_faiss")
    with pytest.raises(InvalidValueError, match="search must be one of auto, torch, faiss") as info:
        pc.PatchCoreConfig(search="annoy")
    assert info.value.fields == ("search",)
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(InvalidValueError, match="needs the faiss package"):
        pc.patchcore_tiny(image_size=64, search="faiss")


def test_forced_faiss_and_the_export_switch():
    pytest.importorskip("faiss")
    from visionscale.runtime.export import export_ready

    torch.manual_seed(0)
    m = pc.patchcore_tiny(image_size=64, search="faiss").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = m(x)
    assert m.nn_search.search_choice["backend"] == "faiss" and m.nn_search.use_faiss
    ready, notes = export_ready(m)  # the exporter's switch to the torch search still works
    assert ready.nn_search.search == "torch" and not ready.nn_search.use_faiss and notes
    with torch.no_grad():
        torch_out = ready(x)
    # Same neighbours and distances refined the same way: equal up to float rounding.
    torch.testing.assert_close(torch_out["anomaly_map"], out["anomaly_map"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch_out["pred_score"], out["pred_score"], rtol=1e-6, atol=1e-6)


def test_state_dict_is_unchanged_and_the_module_copies():
    """Runs saved before the search kept stats load as they are: no new buffers."""
    torch.manual_seed(0)
    m = pc.patchcore_tiny(image_size=64).eval()
    with torch.no_grad():
        before = m(torch.randn(1, 3, 64, 64))["pred_score"]
    assert [k for k in m.state_dict() if k.startswith("nn_search.")] == ["nn_search.memory_bank"]
    old_state = {k: v.clone() for k, v in m.state_dict().items()}
    fresh = pc.patchcore_tiny(image_size=64).eval()
    fresh.load_state_dict(old_state)  # strict
    twin = copy.deepcopy(m)
    pickle.loads(pickle.dumps(m.nn_search))  # the cached stats' weak references are not pickled
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x)["pred_score"], twin(x)["pred_score"])
    # An in-place change of the bank is seen (the cached stats follow its version).
    with torch.no_grad():
        fresh.nn_search.memory_bank.add_(1.0)
        assert not torch.equal(fresh(x)["pred_score"], twin(x)["pred_score"])
    assert before.shape == (1,)


def test_build_patchcore_no_longer_picks_faiss_because_it_is_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", object())  # "installed"
    m = build_patchcore("patchcore_tiny", (64, 64), 0.1, None)
    assert m.nn_search.search == "auto"
    assert build_patchcore("patchcore_tiny", (64, 64), 0.1, None, search="torch").nn_search.search == "torch"
    with pytest.warns(DeprecationWarning):
        assert build_patchcore("patchcore_tiny", (64, 64), 0.1, None, use_faiss=False).nn_search.search == "torch"
    with pytest.raises(InvalidValueError) as info:
        build_patchcore("patchcore_tiny", (64, 64), 0.1, None, search="fast")
    assert info.value.fields == ("search",)


def test_probe_rows_shrink_for_large_banks():
    search = pc.MemoryBankSearch(1, 4, search="torch")
    assert search.probe_rows_for(4096, 1024) == pc.DEFAULT_PROBE_ROWS  # 256 x 4M multiply-adds: within the budget
    assert search.probe_rows_for(65_536, 1024) == 2**32 // 2**26 == 64  # the same work as 256 rows x 16k x 1024
    assert search.probe_rows_for(327_680, 1024) == 32  # PatchCore-10 of 200 images at 1024 px: the floor
