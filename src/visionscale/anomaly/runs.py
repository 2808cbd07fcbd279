"""Load a fitted run folder: check its files, rebuild its model, wrap it for a backend.

A run folder is what :func:`visionscale.anomaly.train.fit` writes for any method
(:mod:`visionscale.anomaly.run` lists its files). Loading needs no fitting code: this module
knows how each method's model is rebuilt from ``config.json`` and ``model.safetensors``,
and :mod:`visionscale.anomaly.predict` scores with what :func:`load_run` returns.

Every file of a run is checked when it is loaded: a ``config.json`` or ``calibration.json``
that was edited into the wrong type, lost a field or holds NaN raises
:class:`~visionscale.errors.InvalidFileError` naming the file and the field, instead of
predictions that quietly call everything normal.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from visionscale.tiling import TileGrid, Tiling

from visionscale.anomaly.config import FIT_MODELS, TILE_BANKS, FitError, method_of
from visionscale.anomaly.data import IMAGENET_MEAN, IMAGENET_STD
from visionscale.device import resolve_device
from visionscale.errors import InvalidFileError, InvalidValueError, VisionscaleError, check_finite
from visionscale.io.weights import WeightsUnavailableError, load_state_dict

__all__ = ["RunError", "LoadedRun", "load_run", "validate_run_files", "build_run_model", "build_patchcore",
           "SignedInput", "imagenet_to_signed"]


class RunError(VisionscaleError, RuntimeError):
    """A run folder is missing, incomplete or inconsistent; the message says which file."""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise RunError(f"{path.parent} is not a complete run folder: {path.name} is missing")
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise RunError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise InvalidFileError(f"invalid run file {path}: not valid JSON ({exc}); {_EDITED}") from None
    if not isinstance(data, dict):
        raise InvalidFileError(f"invalid run file {path}: expected a JSON object, got {type(data).__name__}; "
                               f"{_EDITED}")
    return data


_EDITED = "the file was edited or is corrupt: restore it or fit the run again"


def _field_error(path: Path, message: str) -> InvalidFileError:
    return InvalidFileError(f"invalid run file {path}: {message}; {_EDITED}")


def _number(path: Path, data: dict, key: str, *, required: bool = True, positive: bool = False) -> None:
    if key not in data:
        if required:
            raise _field_error(path, f"{key} is missing")
        return
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _field_error(path, f"{key} must be a number, got {value!r}")
    try:
        check_finite(key, value, minimum=0.0 if positive else None, min_inclusive=False)
    except InvalidValueError as exc:
        raise _field_error(path, str(exc)) from None


def validate_run_files(run: Path, config: dict, calibration: dict) -> None:
    """Raise :class:`InvalidFileError` naming the file and field that cannot be used as saved."""
    cfg_path, cal_path = run / "config.json", run / "calibration.json"
    model = config.get("model")
    if not isinstance(model, str) or model not in FIT_MODELS:
        raise _field_error(cfg_path, f"model must be one of {', '.join(FIT_MODELS)}, got {model!r}")
    method = config.get("method", method_of(model))
    if method != method_of(model):
        raise _field_error(cfg_path, f"method {method!r} does not match model {model!r}")
    size = config.get("image_size")
    if (not isinstance(size, list) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)):
        raise _field_error(cfg_path, f"image_size must be [height, width] in pixels, got {size!r}")
    if method == "patchcore":
        ratio = config.get("coreset_ratio")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (
                math.isfinite(ratio) and 0 < ratio <= 1):
            raise _field_error(cfg_path, f"coreset_ratio must be a number in (0, 1], got {ratio!r}")
    seed = config.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise _field_error(cfg_path, f"seed must be an integer >= 0, got {seed!r}")
    tiling = config.get("tiling")
    if tiling is not None:
        try:
            Tiling.from_dict(tiling)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise _field_error(cfg_path, f"tiling must be {{tile: [h, w], overlap: [h, w], margin, align, resize}} "
                                         f"with overlap < tile, got {tiling!r} ({exc})") from None
    tile_bank = config.get("tile_bank", "shared")
    if tile_bank not in TILE_BANKS:
        raise _field_error(cfg_path, f"tile_bank must be one of {', '.join(TILE_BANKS)}, got {tile_bank!r}")
    if tile_bank == "per-position":
        if tiling is None:
            raise _field_error(cfg_path, "tile_bank per-position needs the tiling its banks were fitted with")
        try:
            TileGrid.from_dict(config["tile_grid"])
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise _field_error(cfg_path, f"tile_bank per-position needs tile_grid {{image_size: [h, w], tile: [h, w], "
                                         f"ys: [...], xs: [...], positions}}, got {config.get('tile_grid')!r} "
                                         f"({exc})") from None
    if not isinstance(config.get("pdn_padding", True), bool):
        raise _field_error(cfg_path, f"pdn_padding must be true or false, got {config['pdn_padding']!r}")
    for key in ("image_threshold", "pixel_threshold"):
        _number(cal_path, calibration, key)
    for key in ("image_span", "pixel_span"):
        _number(cal_path, calibration, key, positive=True)
    for key in ("image_min", "image_max", "pixel_min", "pixel_max"):  # informative; finite if there
        _number(cal_path, calibration, key, required=False)


@dataclass
class LoadedRun:
    """A fitted model with its thresholds, ready to score images."""

    path: Path
    config: dict
    calibration: dict
    model: torch.nn.Module  # or a visionscale.runtime.Runner (load_run with a backend / precision)
    device: torch.device

    @property
    def image_size(self) -> tuple[int, int]:
        h, w = self.config["image_size"]
        return int(h), int(w)

    @property
    def tiling(self) -> Tiling | None:
        """The tiling the run was fitted with (``config.json``'s ``tiling``), or None: whole images."""
        t = self.config.get("tiling")
        return Tiling.from_dict(t) if t else None

    @property
    def tile_bank(self) -> str:
        """PatchCore's banks of a tiled run: ``"shared"`` (also every other run) or ``"per-position"``."""
        return self.config.get("tile_bank", "shared")


def load_run(run: str | os.PathLike, device: str | torch.device = "auto", *, backend: str = "eager",
             precision: str = "fp32") -> LoadedRun:
    """Load ``config.json``, ``model.safetensors`` and ``calibration.json`` of a run folder.

    With another ``backend`` (``compile``, ``onnxruntime``, ``tensorrt``) or ``precision``
    (``fp16``, ``bf16``) than eager fp32, ``model`` is a :class:`visionscale.runtime.Runner`
    around the fitted model (its ``info`` says what actually runs); scoring is unchanged.

    Raises:
        RunError: The folder or one of its files is missing or unreadable.
        InvalidFileError: ``config.json`` or ``calibration.json`` was edited into something
            unusable (wrong type, a missing or non-finite field); the message names both.
    """
    path = Path(run).expanduser()
    if not path.is_dir():
        raise RunError(f"run folder not found: {path}")
    config = _read_json(path / "config.json")
    calibration = _read_json(path / "calibration.json")
    validate_run_files(path, config, calibration)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise RunError(f"{path} is not a complete run folder: model.safetensors is missing (did fitting finish?)")
    if config.get("tile_bank") == "per-position" and backend != "eager":
        raise RunError(f"{path} has per-position memory banks, which the search selects per tile in Python: it "
                       f"runs with backend eager only, not {backend!r}")
    dev = resolve_device(device)
    try:
        model = build_run_model(config, load_state_dict(weights), str(weights))
    except (ValueError, RuntimeError, KeyError) as exc:
        raise RunError(f"cannot load {weights}: {exc}") from None
    model.eval().to(dev)
    if backend != "eager" or precision != "fp32":
        model = _runner(model, config, backend, precision, dev)
    return LoadedRun(path, config, calibration, model, dev)


def _runner(model: torch.nn.Module, config: dict, backend: str, precision: str, device: torch.device):
    from visionscale.runtime import accelerate
    from visionscale.runtime.errors import BackendUnavailableError, ExportError, RunnerError

    h, w = config["image_size"]
    try:
        return accelerate(model, backend, precision, device, image_size=(int(h), int(w)))
    except (BackendUnavailableError, ExportError, RunnerError) as exc:
        raise RunError(f"backend {backend!r} / {precision}: {exc}") from None




def build_patchcore(name: str, image_size: tuple[int, int], coreset_ratio: float, weights: str | None, seed: int = 0,
                    search: str = "auto", use_faiss: bool | None = None):
    """PatchCore from the registry with a placeholder bank (replaced by the fitted one).

    Random weights are drawn from ``seed`` so a resumed fit sees the same backbone.
    ``search`` is the nearest-neighbour search (``"auto"``: the faster of torch and faiss,
    measured on the first batch, see :class:`visionscale.anomaly.patchcore.MemoryBankSearch`;
    ``"torch"``; ``"faiss"``); ``use_faiss`` is its deprecated alias. Whether faiss is
    installed no longer decides it: on a 2-core CPU faiss's flat search was measured
    slower than the torch search (docs/benchmarks.md).
    """
    from visionscale import registry

    torch.manual_seed(seed)
    try:
        # num_train_images=1: the placeholder bank is one image's coreset, not the data's.
        return registry.create(name, image_size=image_size, coreset_ratio=coreset_ratio, num_train_images=1,
                               backbone_weights=weights, search=search, use_faiss=use_faiss)
    except WeightsUnavailableError as exc:
        raise FitError(str(exc)).about("weights") from None
    except InvalidValueError:
        raise  # search / use_faiss: already about its field
    except FileNotFoundError as exc:
        raise FitError(f"weights: {exc}").about("weights") from None
    except (ValueError, RuntimeError) as exc:  # unreadable file, keys that do not fit the backbone
        raise FitError(f"weights {weights}: {exc}").about("weights") from None


class SignedInput(torch.nn.Module):
    """Feeds a model that expects [-1, 1] images (DDAD) with ImageNet-normalised batches.

    The data layer normalises every batch with the ImageNet mean and std; DDAD's U-Net works
    on ``2 x [0, 1] - 1`` (official ``Dataset_maker``). No parameters: the wrapped model's
    state dict is the run's.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(2 * (x * self.std + self.mean) - 1)


def imagenet_to_signed(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised (B, 3, H, W) -> [-1, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return 2 * (x * std + mean) - 1


def build_run_model(config: dict, state: dict[str, torch.Tensor], source: str = "model.safetensors"):
    """Rebuild a fitted model from a run's ``config.json`` and ``model.safetensors`` state dict.

    Returns a module whose ``forward`` takes ImageNet-normalised batches and returns
    ``pred_score`` and ``anomaly_map``, for every method.

    Raises:
        ValueError: The state dict does not fit the model the config names.
    """
    from visionscale import registry
    from visionscale.io.weights import load_into

    name = config["model"]
    method = config.get("method") or method_of(name)
    if method == "patchcore":
        model = build_patchcore(name, tuple(config["image_size"]), float(config["coreset_ratio"]), None,
                            seed=int(config.get("seed", 0)))
        bank = state.get("nn_search.memory_bank")
        if bank is None:
            raise ValueError(f"{source} has no memory bank (nn_search.memory_bank)")
        offsets = state.get("nn_search.bank_offsets")  # per-position runs only
        per_position = config.get("tile_bank") == "per-position"
        if per_position != (offsets is not None):
            raise ValueError(f"config.json says tile_bank {config.get('tile_bank', 'shared')}, but {source} "
                             f"{'holds' if offsets is not None else 'has no'} per-position bank offsets "
                             f"(nn_search.bank_offsets)")
        model.set_memory_bank(bank, offsets)  # its size differs from the placeholder's
        load_into(model, state, source=source)
        if per_position:
            grid = TileGrid.from_dict(config["tile_grid"])
            if len(grid) != model.nn_search.num_positions:
                raise ValueError(f"config.json's tile_grid has {len(grid)} positions, {source} holds "
                                 f"{model.nn_search.num_positions} per-position banks")
            model.tile_grid = grid
        return model
    if method == "efficientad":
        model = registry.create(name, padding=bool(config.get("pdn_padding", True)))
        load_into(model, state, source=source)
        return model
    model = registry.create(name)
    load_into(model, state, source=source)
    return SignedInput(model)

