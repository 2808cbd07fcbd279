"""Weight files: safe loading, the download cache (offline), atomic saving."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from urllib.error import URLError

import pytest
import safetensors.torch
import torch
from torch import nn

from visionscale.io import weights as W
from visionscale.io.weights import (
    StateDictMismatchError,
    WeightsSpec,
    WeightsUnavailableError,
    cache_path_for,
    download_to_cache,
    load_into,
    load_state_dict,
    save_file_atomic,
)

URL = "https://download.pytorch.org/models/wide_resnet101_2-32ee1156.pth"


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 4, generator=g),
        "b.num_batches_tracked": torch.tensor(7),
        "c.half": torch.randn(5, generator=g).half(),
    }


def _assert_same(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> None:
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


# --- WeightsSpec ---------------------------------------------------------------------


def test_weights_spec_is_frozen_and_names_its_file():
    spec = WeightsSpec("IMAGENET1K_V1", URL, 1, (224, 224), (0.5,) * 3, (0.2,) * 3, "BSD-3-Clause", "32ee1156")
    assert spec.filename == "wide_resnet101_2-32ee1156.pth"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.url = "x"  # type: ignore[misc]


# --- load_state_dict -------------------------------------------------------------------


def test_safetensors_round_trip(tmp_path):
    t = _tensors()
    path = save_file_atomic(t, tmp_path / "w.safetensors")
    _assert_same(load_state_dict(path), t)


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_pickle_round_trip(tmp_path, suffix):
    t = _tensors()
    torch.save(t, tmp_path / f"w{suffix}")
    _assert_same(load_state_dict(tmp_path / f"w{suffix}"), t)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_training_checkpoint_wrapper_is_unwrapped(tmp_path, wrapper):
    t = _tensors()
    torch.save({wrapper: t, "epoch": 3, "arch": "resnet"}, tmp_path / "ckpt.pth")
    _assert_same(load_state_dict(tmp_path / "ckpt.pth"), t)


def test_non_tensor_entries_are_rejected(tmp_path):
    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match=r"'step'"):
        load_state_dict(tmp_path / "x.pth")


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_state_dict(missing)


def test_unsupported_suffix_names_the_path(tmp_path):
    p = tmp_path / "weights.npz"
    p.write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match=r"weights\.npz") as e:
        load_state_dict(p)
    assert ".safetensors" in str(e.value)


@pytest.mark.parametrize("name", ["bad.pth", "bad.safetensors", "empty.pth"])
def test_corrupt_files_raise_value_error_with_path(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b"" if name.startswith("empty") else b"not a checkpoint" * 20)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_state_dict(p)


def test_truncated_checkpoint_raises_value_error(tmp_path):
    torch.save({"w": torch.randn(1000)}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pth"):
        load_state_dict(tmp_path / "cut.pth")


class _Payload:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_objects_are_refused_and_never_executed(tmp_path):
    marker = tmp_path / "PWNED"
    torch.save({"w": torch.ones(2), "evil": _Payload(str(marker))}, tmp_path / "evil.pth")
    assert not marker.exists()
    with pytest.raises(ValueError, match="evil.pth") as e:
        load_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()
    assert "weights_only" in str(e.value)
    assert "weights_only=False" not in str(e.value)  # we must not advise the unsafe path


def test_torch_load_is_called_weights_only_on_cpu(tmp_path, monkeypatch):
    torch.save(_tensors(), tmp_path / "w.pth")
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_state_dict(tmp_path / "w.pth")
    assert calls and calls[0].get("weights_only") is True
    assert str(calls[0].get("map_location")) == "cpu"


# --- load_into -----------------------------------------------------------------------


def test_load_into_lists_missing_unexpected_and_shape_mismatches():
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    sd = dict(net.state_dict())
    sd.pop("1.bias")
    sd["0.weight"] = torch.zeros(5, 4)
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(StateDictMismatchError) as e:
        load_into(net, sd, source="file.pth")
    msg = str(e.value)
    assert "file.pth" in msg and "1.bias" in msg and "extra.weight" in msg
    assert "0.weight: file (5, 4) vs model (3, 4)" in msg


def test_load_into_hints_at_dataparallel_prefix():
    net = nn.Linear(2, 2)
    sd = {f"module.{k}": v for k, v in net.state_dict().items()}
    with pytest.raises(StateDictMismatchError, match="module."):
        load_into(net, sd)


def test_load_into_loads_matching_weights():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    load_into(b, a.state_dict())
    assert torch.equal(a.weight, b.weight)


# --- download_to_cache -----------------------------------------------------------------


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    # torch.hub.get_dir() = $TORCH_HOME/hub unless set_dir() was called.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


def test_cache_path_is_torch_hub_checkpoints(torch_home):
    assert cache_path_for(URL) == torch_home / "hub" / "checkpoints" / "wide_resnet101_2-32ee1156.pth"


def test_offline_download_error_names_url_cache_path_and_alternatives(torch_home, monkeypatch):
    def offline(url, dst, hash_prefix=None, progress=True):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsUnavailableError) as e:
        download_to_cache(URL)
    assert isinstance(e.value, RuntimeError)
    msg = str(e.value)
    assert URL in msg
    assert str(torch_home / "hub" / "checkpoints" / "wide_resnet101_2-32ee1156.pth") in msg
    assert ".safetensors" in msg and ".pth" in msg
    assert "weights=None" in msg
    assert "name resolution" in msg  # the underlying reason is kept


def test_download_passes_hash_prefix_from_filename_and_then_uses_cache(torch_home, monkeypatch):
    calls = []

    def fake(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        Path(dst).write_bytes(b"payload")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake)
    first = download_to_cache(URL, progress=False)
    second = download_to_cache(URL, progress=False)
    assert first == second == cache_path_for(URL)
    assert first.read_bytes() == b"payload"
    assert calls == [(URL, "32ee1156")]  # one download, hash prefix from the file name


def _file_url(tmp_path: Path, payload: bytes, good_hash: bool) -> str:
    digest = hashlib.sha256(payload).hexdigest()[:8]
    prefix = digest if good_hash else ("0" * 8 if digest != "0" * 8 else "1" * 8)
    src = tmp_path / "server" / f"net-{prefix}.pth"
    src.parent.mkdir()
    src.write_bytes(payload)
    return src.as_uri()


def test_real_download_verifies_sha256(tmp_path, torch_home):
    # file:// goes through torch.hub's real download and hash check without a network.
    url = _file_url(tmp_path, b"weights" * 100, good_hash=True)
    dst = download_to_cache(url, progress=False)
    assert dst.read_bytes() == b"weights" * 100
    assert dst.parent == torch_home / "hub" / "checkpoints"


def test_hash_mismatch_raises_and_caches_nothing(tmp_path, torch_home):
    url = _file_url(tmp_path, b"tampered" * 100, good_hash=False)
    with pytest.raises(ValueError, match="sha256"):
        download_to_cache(url, progress=False)
    ckpt = torch_home / "hub" / "checkpoints"
    assert not ckpt.exists() or list(ckpt.iterdir()) == []


def test_contradicting_hash_prefix_is_rejected(torch_home):
    with pytest.raises(ValueError, match="contradicts"):
        download_to_cache(URL, sha256_prefix="deadbeef")


# --- save_file_atomic --------------------------------------------------------------------


def test_atomic_save_leaves_no_temp_files_and_overwrites(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file_atomic({"x": torch.zeros(3)}, path)
    save_file_atomic({"x": torch.ones(3)}, path)
    assert os.listdir(tmp_path) == ["w.safetensors"]
    assert torch.equal(load_state_dict(path)["x"], torch.ones(3))


def test_atomic_save_makes_noncontiguous_tensors_contiguous(tmp_path):
    t = torch.arange(12.0).reshape(3, 4).t()
    assert not t.is_contiguous()
    path = save_file_atomic({"t": t}, tmp_path / "nc.safetensors")
    assert torch.equal(load_state_dict(path)["t"], t)


def test_failed_save_does_not_clobber_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_file_atomic({"x": torch.ones(3)}, path)
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half written")  # a partial write, then a crash
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_file_atomic({"x": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_failed_save_of_non_tensor_cleans_up(tmp_path):
    with pytest.raises(Exception):
        save_file_atomic({"x": 3}, tmp_path / "bad.safetensors")  # type: ignore[dict-item]
    assert os.listdir(tmp_path) == []


def test_module_exports():
    for name in W.__all__:
        assert hasattr(W, name), name
