"""Weight files: metadata, safe loading, the download cache and atomic saving.

Loading never unpickles arbitrary objects: ``.pth``/``.pt``/``.bin`` files go through
``torch.load(..., weights_only=True)`` and ``.safetensors`` files through safetensors.
Downloads land in torch.hub's checkpoint cache (``torch.hub.get_dir()/checkpoints``),
the same place torchvision uses, so a file fetched by either is found by both.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import pickle
import re
import socket
import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.parse import urlparse

import safetensors.torch
import torch
from torch import Tensor, nn

from visionscale.errors import InvalidFileError, VisionscaleError
from visionscale.io.atomic import atomic_path

__all__ = [
    "WeightsSpec",
    "WeightsUnavailableError",
    "StateDictMismatchError",
    "WeightsFileError",
    "WeightsFileNotFoundError",
    "load_state_dict",
    "check_safetensors_header",
    "load_into",
    "download_to_cache",
    "cache_path_for",
    "save_file_atomic",
]

PICKLE_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
# torchvision names files ``<arch>-<first 8 hex digits of sha256>.pth`` (torch.hub.HASH_REGEX).
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")
# Wrappers that training scripts put around the state dict.
_WRAPPER_KEYS = ("state_dict", "model")
# Errors that mean "the URL could not be fetched" (no network, DNS, refused, HTTP 404...).
_NETWORK_ERRORS = (URLError, ConnectionError, TimeoutError, socket.gaierror, http.client.HTTPException)


@dataclass(frozen=True)
class WeightsSpec:
    """Where a set of pretrained weights comes from and how inputs must look for it.

    Attributes:
        name: Weights name, e.g. ``"IMAGENET1K_V1"``.
        url: Download URL (or ``""`` for weights that only exist as local files).
        num_params: Parameter count of the network these weights fit.
        input_size: Training crop ``(H, W)``; the nets themselves accept any size.
        mean: Per-channel RGB mean the inputs were normalised with (0..1 scale).
        std: Per-channel RGB std.
        license: SPDX identifier of the weights' licence as published.
        sha256_prefix: Leading hex digits of the file's sha256 (checked on download).
        resize_size: Shorter-side resize before the centre crop in the eval recipe.
    """

    name: str
    url: str
    num_params: int
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    license: str
    sha256_prefix: str | None = None
    resize_size: int | None = None

    @property
    def filename(self) -> str:
        return Path(urlparse(self.url).path).name


class WeightsUnavailableError(VisionscaleError, RuntimeError):
    """Pretrained weights could not be downloaded and are not in the cache."""


class StateDictMismatchError(VisionscaleError, RuntimeError):
    """A state dict does not fit a model (missing/unexpected keys or wrong shapes)."""


class WeightsFileError(InvalidFileError):
    """A weights file is corrupt, truncated, of an unknown kind or not a plain state dict; names the file."""


class WeightsFileNotFoundError(VisionscaleError, FileNotFoundError):
    """A weights file that does not exist."""


# Bytes per element of every dtype safetensors' torch loader knows.
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1,
                      "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8,
                      "F64": 8, "C64": 8}
_MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit


def _nonneg_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def check_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """Validate a safetensors file's header against its size; return the header (a dict).

    The checks are the format's rules, made here so each failure names the file and the field:
    an 8-byte little-endian header length that fits the file, a UTF-8 JSON object, a string ->
    string ``__metadata__``, and per tensor a known ``dtype``, a ``shape`` of non-negative
    integers and ``data_offsets`` whose span is exactly shape x dtype size; the tensors tile the
    data after the header with no gap or overlap.

    Raises:
        WeightsFileError: The first rule the file breaks.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsFileError(f"{p} is not a safetensors file: {size} bytes, too short for the 8-byte "
                                       f"header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > _MAX_SAFETENSORS_HEADER:
                raise WeightsFileError(f"{p} is not a valid safetensors file: its header length field says {n} "
                                       f"bytes, but {size - 8} bytes follow it (truncated or not safetensors)")
            raw = f.read(n)
    except OSError as e:
        raise WeightsFileError(f"cannot read weights file {p}: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise WeightsFileError(f"{p} is not a valid safetensors file: its header is not UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise WeightsFileError(f"{p} is not a valid safetensors file: its header is a JSON "
                               f"{type(header).__name__}, not an object")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict)
                                 and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise WeightsFileError(f"{p}: __metadata__ in the safetensors header must map strings to strings")
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{p}: tensor {name!r} in the safetensors header"
        if not isinstance(info, dict):
            raise WeightsFileError(f"{where} is a {type(info).__name__}, not an object with dtype/shape/data_offsets")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise WeightsFileError(f"{where}: dtype {dtype!r} is not one of {', '.join(SAFETENSORS_DTYPES)}")
        if not isinstance(shape, list) or not all(_nonneg_int(d) for d in shape):
            raise WeightsFileError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_nonneg_int(o) for o in offs) and offs[0] <= offs[1]):
            raise WeightsFileError(f"{where}: data_offsets {offs!r} is not [begin, end] with 0 <= begin <= end")
        if offs[1] > data_len:
            raise WeightsFileError(f"{where}: data_offsets {offs} reach past the end of the data ({data_len} bytes; "
                                   f"file truncated?)")
        need = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
        if offs[1] - offs[0] != need:
            raise WeightsFileError(f"{where}: shape {shape} of {dtype} needs {need} bytes, but data_offsets {offs} "
                                   f"span {offs[1] - offs[0]}")
        spans.append((offs[0], offs[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise WeightsFileError(f"{p}: tensor {name!r} starts at data byte {begin}, expected {end} "
                                   f"(tensors overlap or leave a gap)")
        end = stop
    if end != data_len:
        raise WeightsFileError(f"{p}: the tensors in the safetensors header cover {end} bytes, "
                               f"but the file holds {data_len} bytes of data")
    return header


def _unpickling_reason(exc: BaseException) -> str:
    """What torch.load(weights_only=True) refused, without torch's advice to load unsafely.

    torch wraps the unpickler's own error ("Unsupported global: GLOBAL pathlib.Path was not an
    allowed global by default", "Trying to load unsupported GLOBAL posix.system whose module posix
    is blocked") in paragraphs that suggest ``weights_only=False``; keep the error whole.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    text = text.split("\n\nCheck the documentation of torch.load")[0]
    if "WeightsUnpickler error:" in text:
        reason = text.rsplit("WeightsUnpickler error:", 1)[1]
    else:
        paragraphs = [q.strip() for q in text.split("\n\n") if q.strip()]
        reason = paragraphs[-1] if len(paragraphs) > 1 else (paragraphs or [type(exc).__name__])[0]
    # Drop the sentences that advise weights_only=False or allowlisting globals: neither is
    # offered here, and the first would run the file's code.
    reason = re.sub(r"\s*(In PyTorch 2\.6|Re-running `torch\.load`|Please use `torch\.serialization)[^\n]*", "", reason)
    reason = " ".join(reason.split())
    return f"Weights only load failed. {reason}" if reason else "Weights only load failed."


def load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or ``.pth``/``.pt``/``.bin`` onto the CPU.

    Pickle files are read with ``weights_only=True``: a file that holds anything
    other than tensors and plain containers is refused, never executed. A top-level
    ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped. A safetensors
    header is validated first (:func:`check_safetensors_header`).

    Raises:
        WeightsFileNotFoundError: ``path`` does not exist (a ``FileNotFoundError``).
        WeightsFileError: Unsupported suffix, unreadable/corrupt file, or non-tensor entries
            (a ``ValueError``); the message names the file.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsFileNotFoundError(f"weights file not found: {p}")
    if p.is_dir():
        raise WeightsFileError(f"weights path is a directory, expected a file: {p}")
    suffix = p.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        check_safetensors_header(p)
        try:
            obj = safetensors.torch.load_file(str(p), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError, OSError...
            raise WeightsFileError(f"could not read safetensors file {p}: {e}") from e
    elif suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # Refused globals and garbage bytes both land here. torch's own message
            # suggests weights_only=False; we never do that, so keep only the reason.
            raise WeightsFileError(
                f"refused to load {p}: it is corrupt or pickles objects other than tensors "
                f"(torch.load with weights_only=True: {_unpickling_reason(e)}) Arbitrary pickled objects "
                f"are never unpickled here; re-save it as a plain state dict "
                f"(torch.save(model.state_dict(), path)) or as .safetensors."
            ) from e
        except MemoryError:
            raise
        except Exception as e:  # a corrupt zip or pickle can fail in many ways (zipfile, EOF, struct...)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise WeightsFileError(f"could not read checkpoint {p} (corrupt or truncated?): "
                                   f"{type(e).__name__}: {first}") from e
    else:
        allowed = ", ".join((SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES))
        raise WeightsFileError(f"unsupported weights file type {suffix or '(no suffix)'!r} for {p}; "
                               f"expected one of {allowed}")
    return _as_tensor_dict(obj, p)


def _as_tensor_dict(obj: object, p: Path) -> dict[str, Tensor]:
    # Unwrap {"state_dict": {...}} / {"model": {...}} (also nested once more, as in
    # {"model": {"state_dict": ...}}), but only when the wrapper is not itself tensors.
    for _ in range(2):
        if isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is not None:
                obj = inner
    if not isinstance(obj, Mapping):
        raise WeightsFileError(f"{p} holds a {type(obj).__name__}, expected a state dict (mapping of names to tensors)")
    bad = [f"{k!r}: {type(v).__name__}" for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        shown = ", ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        raise WeightsFileError(f"{p} is not a plain state dict; non-tensor entries: {shown}")
    return dict(obj)


def load_into(module: nn.Module, state_dict: Mapping[str, Tensor], source: str = "state dict") -> None:
    """``module.load_state_dict(state_dict, strict=True)`` with a readable error.

    Raises:
        StateDictMismatchError: Lists missing keys, unexpected keys and shape mismatches.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:

        def fmt(items: list[str]) -> str:
            return ", ".join(items[:10]) + (f" ... (+{len(items) - 10} more)" if len(items) > 10 else "")

        parts = [f"weights from {source} do not fit {type(module).__name__}"]
        if missing:
            parts.append(f"{len(missing)} missing keys: {fmt(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {fmt(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches: {fmt(shapes)}")
        if unexpected and all(k.startswith("module.") for k in unexpected):
            parts.append("hint: keys start with 'module.' (saved from DataParallel); strip that prefix")
        raise StateDictMismatchError("; ".join(parts))
    module.load_state_dict(state_dict, strict=True)


def checkpoint_dir() -> Path:
    """torch.hub's checkpoint cache, ``$TORCH_HOME/hub/checkpoints`` by default."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def cache_path_for(url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`download_to_cache` stores ``url`` (file name = URL's last component)."""
    name = Path(urlparse(url).path).name
    if not name:
        raise ValueError(f"cannot derive a file name from URL {url!r}")
    return (Path(cache_dir) if cache_dir is not None else checkpoint_dir()) / name


def download_to_cache(
    url: str,
    sha256_prefix: str | None = None,
    *,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Return the cached file for ``url``, downloading it first if needed.

    The sha256 prefix defaults to the one in the file name (``name-32ee1156.pth``), as
    torchvision's ``check_hash`` does. It is checked on download; a file already in the
    cache is trusted (as torch.hub does) so that large files are not re-hashed each run.

    Raises:
        WeightsUnavailableError: The download failed (e.g. offline); the message says
            where to put the file by hand and what else to pass instead.
        WeightsFileError: The downloaded file's hash does not match (nothing is written to
            the cache then).
        ValueError: ``sha256_prefix`` contradicts the file name.
    """
    dst = cache_path_for(url, cache_dir)
    m = _HASH_IN_NAME.search(dst.name)
    if sha256_prefix is None:
        sha256_prefix = m.group(1) if m else None
    elif m and not (m.group(1).startswith(sha256_prefix) or sha256_prefix.startswith(m.group(1))):
        raise ValueError(f"sha256 prefix {sha256_prefix!r} contradicts the file name {dst.name!r} of {url}")
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Looked up at call time so tests can monkeypatch torch.hub.download_url_to_file.
        # It downloads to a ".partial" file beside dst and moves it only when complete.
        torch.hub.download_url_to_file(url, str(dst), hash_prefix=sha256_prefix, progress=progress)
    except _NETWORK_ERRORS as e:
        raise WeightsUnavailableError(
            f"could not download pretrained weights from {url} ({e}).\n"
            f"If this machine is offline, download the file elsewhere and put it at:\n"
            f"    {dst}\n"
            f"Alternatively pass a local .pth/.safetensors file path as weights=..., "
            f"or weights=None for random initialisation."
        ) from e
    except RuntimeError as e:
        if "invalid hash" in str(e):
            raise WeightsFileError(f"download of {url} failed the sha256 check ({e}); "
                                   f"nothing was cached at {dst}") from e
        raise
    return dst


def save_file_atomic(
    tensors: Mapping[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``tensors`` as safetensors to ``path`` atomically.

    The data goes to a temporary file in the same directory (same file system, so
    ``os.replace`` is an atomic rename) and is fsynced first: readers see either the
    old file or the complete new one, and a failure leaves the old file untouched.
    """
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    # safetensors wants contiguous tensors; .contiguous() is a no-op when they are.
    data = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_path(p) as tmp:
        safetensors.torch.save_file(data, tmp, metadata=metadata)
    return p


def optimizer_to_tensors(opt: torch.optim.Optimizer, prefix: str = "optim.") -> tuple[dict[str, Tensor], dict]:
    """Split an optimizer's ``state_dict`` for a safetensors checkpoint: its tensors as
    ``{prefix}{param index}.{name}`` and the rest (param groups, scalar state such as a step
    count stored as a number) as a JSON-able dict for the file's metadata."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"{prefix}{idx}.{name}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: Mapping[str, Tensor], meta: dict,
                           prefix: str = "optim.") -> None:
    """Restore what :func:`optimizer_to_tensors` split (other keys in ``tensors`` are ignored)."""
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith(prefix):
            idx, name = key[len(prefix):].split(".", 1)
            state.setdefault(int(idx), {})[name] = v
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def config_differences(saved: Any, current: Any, ignore: Collection[str] = ()) -> list[str]:
    """``"name: saved (saved) vs current"`` for each dataclass field (not in ``ignore``) that
    differs between a checkpoint's training config and the one asked for: why a resume is refused."""
    from dataclasses import fields

    return [f"{f.name}: {getattr(saved, f.name)!r} (saved) vs {getattr(current, f.name)!r}"
            for f in fields(current) if f.name not in ignore and getattr(saved, f.name) != getattr(current, f.name)]
