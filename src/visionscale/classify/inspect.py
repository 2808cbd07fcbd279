"""Look inside any registered model (or a trained classifier): layers, filters, feature maps.

Seed 004 inspects a Keras CNN three ways: ``model.summary()`` (layer, output shape,
parameters), the first layer's filters as little images, and one layer's feature maps
for an input image. This module does the same for every model in the registry:

* the layer table comes from the profiler's analytic pass on the ``meta`` device
  (:func:`visionscale.study.memory.estimate_model`: one record per executed leaf
  module with its output shape and bytes), extended with parameter counts, the
  convolution arithmetic of each sliding-window layer and its receptive field
  (:mod:`visionscale.classify.convarith`);
* filters and feature maps are rendered as PNG grids with Pillow.

Receptive fields are followed tensor by tensor through leaf modules. A residual ``+``
that runs outside any module keeps the field of its main branch (in ResNets the widest
one); after an operation the pass cannot follow (``interpolate``, ``cat``) the field is
reported as unknown.
"""

from __future__ import annotations

import copy
import csv
import difflib
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from visionscale.classify.convarith import conv_output_size
from visionscale.components import components_of, run_components
from visionscale.errors import VisionscaleError

__all__ = [
    "LayerRow",
    "LayerTable",
    "InspectError",
    "layer_table",
    "first_conv_layer",
    "filter_grid_png",
    "feature_maps",
    "feature_grid_png",
    "tile_grid",
    "indexed_grid",
    "load_model_for_inspect",
    "inspect_model",
    "valid_layer_names",
]

class InspectError(VisionscaleError, ValueError):
    """Bad input for inspection: unknown layer, channel mismatch, unusable model."""


@dataclass
class LayerRow:
    """One executed layer (leaf module or free-standing tensor op)."""

    component: str
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    activation_bytes: int
    window: str = ""  # "k7 s2 p3" for convolutions / pooling
    in_size: int | None = None  # input height seen by a windowed layer
    out_size: int | None = None
    rf: int | None = None  # receptive field (input pixels, along the height)
    jump: int | None = None  # output stride relative to the input

    def as_dict(self) -> dict:
        d = self.__dict__.copy()
        d["output_shape"] = list(self.output_shape)
        return d


@dataclass
class LayerTable:
    """The per-layer table of one model at one input size."""

    model: str
    input_shape: tuple[int, ...]
    rows: list[LayerRow]
    total_params: int
    params_bytes: int
    activation_sum_bytes: int
    activation_peak_bytes: int
    components: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"model": self.model, "input_shape": list(self.input_shape), "layers": len(self.rows),
                "total_params": self.total_params, "params_bytes": self.params_bytes,
                "activation_sum_bytes": self.activation_sum_bytes, "activation_peak_bytes": self.activation_peak_bytes,
                "components": self.components}

    def csv_bytes(self) -> bytes:
        buf = io.StringIO()
        cols = ["component", "name", "kind", "output_shape", "params", "activation_bytes", "window", "in_size",
                "out_size", "rf", "jump"]
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            d = r.as_dict()
            d["output_shape"] = "x".join(str(s) for s in r.output_shape)
            w.writerow({k: ("" if d[k] is None else d[k]) for k in cols})
        return buf.getvalue().encode()

    def markdown(self) -> str:
        lines = [f"# Layers of `{self.model}` at input {tuple(self.input_shape)}", "",
                 "| component | layer | type | output shape | params | activation | window | size | RF | jump |",
                 "|---|---|---|---|---:|---:|---|---|---:|---:|"]
        for r in self.rows:
            size = f"{r.in_size}→{r.out_size}" if r.in_size is not None else ""
            lines.append(f"| {r.component} | `{r.name}` | {r.kind} | {tuple(r.output_shape)} | {r.params:,} | "
                         f"{_fmt_bytes(r.activation_bytes)} | {r.window} | {size} | {'' if r.rf is None else r.rf} | "
                         f"{'' if r.jump is None else r.jump} |")
        lines += ["", f"Parameters: {self.total_params:,} (with buffers {_fmt_bytes(self.params_bytes)}). "
                      f"Activations: sum {_fmt_bytes(self.activation_sum_bytes)}, "
                      f"peak of live tensors {_fmt_bytes(self.activation_peak_bytes)} (fp32, batch 1).", ""]
        return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
    for unit, div in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= div:
            return f"{n / div:,.1f} {unit}"
    return f"{n} B"


def _pair(v) -> int:
    return int(v[0] if isinstance(v, (tuple, list)) else v)


def _window(m: nn.Module, n_in: int) -> tuple[str, int, int, int, int, int]:
    """``(label, kernel, stride, pad_before, dilation, expected_out)`` of a windowed layer (height axis)."""
    k, s = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size)
    d = _pair(getattr(m, "dilation", 1))
    pad = m.padding
    if isinstance(pad, str):  # Conv2d(padding="same"/"valid"): stride 1, PyTorch puts the extra pixel after
        total = 0 if pad == "valid" else d * (k - 1)
        before, after = total // 2, total - total // 2
    else:
        before = after = _pair(pad)
    ceil = bool(getattr(m, "ceil_mode", False))
    out = conv_output_size(n_in + before + after, k, s, 0, d, ceil_mode=False) if not ceil else \
        conv_output_size(n_in, k, s, before, d, ceil_mode=True)
    label = f"k{k} s{s} p{before}" + (f"+{after}" if after != before else "") + (f" d{d}" if d != 1 else "")
    return label, k, s, before, d, out


class _FieldTracker:
    """Receptive field per tensor, updated by forward hooks on leaf modules."""

    def __init__(self, root: nn.Module):
        self.fields: dict[int, tuple[Tensor, int | None, int | None, float | None]] = {}
        self.calls: list[dict] = []
        self.names = {m: n for n, m in root.named_modules()}

    def seed(self, image: Tensor) -> None:
        self.fields[id(image)] = (image, 1, 1, 0.0)

    def _get(self, t) -> tuple[int | None, int | None, float | None]:
        e = self.fields.get(id(t)) if isinstance(t, Tensor) else None
        return (e[1], e[2], e[3]) if e is not None and e[0] is t else (None, None, None)

    def hook(self, module: nn.Module, args, output) -> None:
        x = next((a for a in args if isinstance(a, Tensor)), None)
        outs = [output] if isinstance(output, Tensor) else [t for t in (output if isinstance(output, (tuple, list)) else ()) if isinstance(t, Tensor)]
        r, j, c = self._get(x)
        info = {"module": module, "window": "", "in_size": None, "out_size": None}
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) and x is not None and x.dim() >= 3:
            n_in = int(x.shape[-2])
            label, k, s, before, d, expected = _window(module, n_in)
            info.update(window=label, in_size=n_in, out_size=expected)
            if r is not None:
                k_eff = d * (k - 1) + 1
                r, c, j = r + (k_eff - 1) * j, c + ((k_eff - 1) / 2 - before) * j, j * s
        elif x is None or not outs or outs[0].dim() < 3 or x.dim() < 3 or outs[0].shape[-2:] != x.shape[-2:]:
            r = j = c = None  # changes the spatial layout in a way we do not model
        for t in outs:
            self.fields[id(t)] = (t, r, j, c)
            self.calls.append({**info, "rf": r, "jump": j})


def _leaf(m: nn.Module) -> bool:
    return next(iter(m.children()), None) is None


def layer_table(model: nn.Module, image_size: int | tuple[int, int] = 224, in_channels: int | None = None,
                name: str | None = None) -> LayerTable:
    """Per-layer table from the profiler's analytic pass on the ``meta`` device.

    The model itself is not touched: a copy is moved to ``meta``, so this costs no
    memory for activations at any resolution.

    Args:
        model: Any ``nn.Module`` (with or without ``components()``).
        image_size: Input height and width (an int for square).
        in_channels: Input channels (default: the first conv's ``in_channels``, else 3).
        name: Label for the table (default: the class name).
    """
    from visionscale.study.memory import estimate_model

    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if hasattr(model, "validate_input_size"):
        model.validate_input_size(h, w)
    if in_channels is None:
        conv = first_conv_layer(model, static=True)
        in_channels = conv[1].in_channels if conv is not None else 3
    meta_model = copy.deepcopy(model).to("meta").eval()
    image = torch.zeros(1, in_channels, h, w, device="meta")
    tracker = _FieldTracker(meta_model)
    tracker.seed(image)
    handles = [m.register_forward_hook(tracker.hook) for m in meta_model.modules() if _leaf(m)]
    full_names = {m: n for n, m in meta_model.named_modules()}
    try:
        parts = components_of(meta_model)
        estimates = estimate_model(parts, image)
    finally:
        for hd in handles:
            hd.remove()
    rows: list[LayerRow] = []
    calls, pos = tracker.calls, 0
    for part in parts:
        est = estimates[part.name]
        local = dict(part.module.named_modules())
        for rec in est.layers:
            if rec.kind == "op":
                rows.append(LayerRow(part.name, f"({rec.name})", "op", rec.shape, 0, rec.bytes))
                continue
            mod = local.get(rec.name)
            # Hooks and the profiler's records fire in the same order; skip hook calls of
            # modules outside this component's tree until the record's module comes up.
            call = None
            for k in range(pos, min(len(calls), pos + 64)):
                if calls[k]["module"] is mod:
                    call, pos = calls[k], k + 1
                    break
            # Modules a component wraps on the fly (ResNet's head Flatten) have no name in the
            # model; label them by component and position.
            qual = full_names.get(mod) if mod is not None else None
            if not qual:
                qual = f"{part.name}.{rec.name}" if rec.name else part.name
            params = sum(p.numel() for p in mod.parameters(recurse=False)) if mod is not None else 0
            row = LayerRow(part.name, qual, rec.kind, rec.shape, params, rec.bytes)
            if call is not None:
                row.window, row.in_size, row.out_size = call["window"], call["in_size"], call["out_size"]
                row.rf, row.jump = call["rf"], call["jump"]
            rows.append(row)
    total = sum(p.numel() for p in model.parameters())
    params_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())
    return LayerTable(
        model=name or type(model).__name__,
        input_shape=(1, in_channels, h, w),
        rows=rows,
        total_params=total,
        params_bytes=params_bytes,
        activation_sum_bytes=sum(e.activation_sum_bytes for e in estimates.values()),
        activation_peak_bytes=max((e.activation_peak_bytes for e in estimates.values()), default=0),
        components=[p.name for p in parts],
    )


def first_conv_layer(model: nn.Module, static: bool = False) -> tuple[str, nn.Conv2d] | None:
    """The first ``Conv2d`` the image meets.

    Registration order is a good guess (``static=True``); otherwise a forward pass on a
    small ``meta`` input finds the first one that actually runs.
    """
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if static or not convs:
        return convs[0] if convs else None
    order: list[nn.Module] = []
    meta_model = copy.deepcopy(model).to("meta").eval()
    meta_convs = [m for m in meta_model.modules() if isinstance(m, nn.Conv2d)]
    handles = [m.register_forward_pre_hook(lambda mod, args: order.append(mod)) for m in meta_convs]
    cin = convs[0][1].in_channels
    try:
        with torch.no_grad():
            _run_until(meta_model, torch.zeros(1, cin, 64, 64, device="meta"), stop_after=None, first=meta_convs)
    except Exception:  # a model that needs a bigger input, a fitted memory bank...
        pass
    finally:
        for hd in handles:
            hd.remove()
    if order:
        idx = meta_convs.index(order[0])
        return convs[idx]
    return convs[0]


class _Stop(Exception):
    pass


def _run_until(model: nn.Module, x: Tensor, stop_after: nn.Module | None, first: Sequence[nn.Module] = ()) -> None:
    """Run the model's components on ``x``; stop early once ``stop_after`` (or any of ``first``) ran."""
    targets = [stop_after] if stop_after is not None else list(first)

    def stop(module, args, output):
        raise _Stop

    handles = [m.register_forward_hook(stop) for m in targets]
    try:
        run_components(components_of(model), x)
    except _Stop:
        pass
    finally:
        for hd in handles:
            hd.remove()


def valid_layer_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def _unknown_layer(name: str, names: list[str]) -> InspectError:
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return InspectError(f"unknown layer {name!r}{hint}; valid layers: {', '.join(names)}")


@torch.no_grad()
def feature_maps(model: nn.Module, x: Tensor, layer: str) -> Tensor:
    """Output of ``layer`` (a name from ``model.named_modules()``) for one image.

    Args:
        model: The model (eval mode is set by the caller).
        x: Normalised image ``(1, C, H, W)``.
        layer: Module name, e.g. ``"conv1"``, ``"layer2"``, ``"layer2.0.conv1"``.

    Returns:
        ``(C, h, w)`` activations of the first image.

    Raises:
        InspectError: Unknown name (lists the valid ones), channel mismatch, a layer that
            did not run or whose output is not a ``(B, C, H, W)`` map.
    """
    modules = dict(model.named_modules())
    names = valid_layer_names(model)
    if layer not in modules or not layer:
        raise _unknown_layer(layer, names)
    conv = first_conv_layer(model, static=True)
    if conv is not None and x.shape[1] != conv[1].in_channels:
        raise InspectError(f"the image has {x.shape[1]} channels but the model's first layer {conv[0]} expects "
                           f"{conv[1].in_channels}")
    captured: list[Tensor] = []

    def grab(module, args, output):
        t = output if isinstance(output, Tensor) else next((o for o in output if isinstance(o, Tensor)), None) \
            if isinstance(output, (tuple, list)) else None
        if t is not None:
            captured.append(t.detach())

    handle = modules[layer].register_forward_hook(grab)
    try:
        _run_until(model, x, stop_after=modules[layer])
    finally:
        handle.remove()
    if not captured:
        raise InspectError(f"layer {layer!r} did not run in a forward pass of {type(model).__name__}")
    out = captured[0]
    if out.dim() != 4:
        raise InspectError(f"layer {layer!r} outputs shape {tuple(out.shape)}, not feature maps (B, C, H, W); "
                           f"pick a convolutional layer or stage")
    return out[0].float().cpu()


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Min-max scale to 0..255 (a constant array becomes mid-gray)."""
    a = np.asarray(a, dtype=np.float64)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if not math.isfinite(lo) or not math.isfinite(hi) or hi - lo < 1e-12:
        return np.full(a.shape, 128, dtype=np.uint8)
    return np.clip(np.rint((a - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def _grid_canvas(tiles: Sequence[np.ndarray], cols: int, pad: int, min_tile: int, background) -> np.ndarray:
    if not tiles:
        raise ValueError("no tiles to draw")
    th, tw = tiles[0].shape[:2]
    if any(t.shape != tiles[0].shape for t in tiles):
        raise ValueError("tiles must all have the same shape")
    f = max(1, math.ceil(min_tile / max(1, min(th, tw))))
    th, tw = th * f, tw * f
    cols = max(1, min(cols, len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    shape = (rows * th + (rows + 1) * pad, cols * tw + (cols + 1) * pad) + tiles[0].shape[2:]
    canvas = np.full(shape, background, dtype=np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = pad + r * (th + pad), pad + c * (tw + pad)
        canvas[y : y + th, x : x + tw] = np.repeat(np.repeat(t, f, axis=0), f, axis=1)
    return canvas


def tile_grid(tiles: Sequence[np.ndarray], cols: int = 8, pad: int = 2, min_tile: int = 48,
              background: int = 255) -> bytes:
    """PNG of equally sized tiles (``(h, w)`` gray or ``(h, w, 3)`` uint8) in a grid.

    Small tiles are enlarged by an integer factor (nearest neighbour, so each weight or
    activation stays a crisp square) until the shorter side is at least ``min_tile``.
    """
    from PIL import Image

    rgb = [np.repeat(t[..., None], 3, axis=2) if t.ndim == 2 else t for t in tiles]
    canvas = _grid_canvas(rgb, cols, pad, min_tile, background)
    if (canvas[..., 0] == canvas[..., 1]).all() and (canvas[..., 1] == canvas[..., 2]).all():
        canvas = canvas[..., 0]  # all gray: a one-channel PNG is a third of the size
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def indexed_grid(tiles: Sequence[np.ndarray], colormap: str = "viridis", cols: int = 8, pad: int = 2,
                 min_tile: int = 64) -> bytes:
    """PNG of gray ``(h, w)`` uint8 tiles drawn through a matplotlib colormap.

    Saved as an 8-bit palette image (255 colormap levels + white for the gaps), about a
    third of the size of the same picture in RGB.
    """
    from matplotlib import colormaps
    from PIL import Image

    levels = [np.minimum(t, 254).astype(np.uint8) for t in tiles]  # index 255 is the white gap colour
    canvas = _grid_canvas(levels, cols, pad, min_tile, 255)
    lut = (colormaps[colormap](np.linspace(0.0, 1.0, 255))[:, :3] * 255).round().astype(np.uint8)
    palette = np.concatenate([lut, np.full((1, 3), 255, dtype=np.uint8)])
    img = Image.frombytes("P", (canvas.shape[1], canvas.shape[0]), canvas.tobytes())
    img.putpalette(palette.ravel().tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def filter_tiles(weight: Tensor, max_filters: int = 64) -> list[np.ndarray]:
    """One tile per output filter of a ``(O, I, kh, kw)`` conv weight.

    Three input channels are shown as an RGB patch, anything else as the mean over
    input channels in gray; each filter is min-max scaled on its own.
    """
    w = weight.detach().float().cpu()[:max_filters]
    tiles = []
    for f in w:
        if f.shape[0] == 3:
            tiles.append(_to_uint8(f.permute(1, 2, 0).numpy()))
        else:
            tiles.append(_to_uint8(f.mean(0).numpy()))
    return tiles


def filter_grid_png(model: nn.Module, max_filters: int = 64, cols: int = 8,
                    conv: tuple[str, nn.Conv2d] | None = None) -> tuple[str, bytes]:
    """``(layer name, PNG)`` of the first conv layer's filters (``conv`` if already known)."""
    conv = conv or first_conv_layer(model)
    if conv is None:
        raise InspectError(f"{type(model).__name__} has no Conv2d layer to show filters of")
    return conv[0], tile_grid(filter_tiles(conv[1].weight, max_filters), cols=cols, min_tile=48)


def feature_grid_png(maps: Tensor, max_maps: int = 64, cols: int = 8, colormap: str = "viridis") -> bytes:
    """PNG of the first ``max_maps`` channels of ``(C, h, w)`` maps, each min-max scaled
    (dark = lowest activation of that map, bright = highest)."""
    tiles = [(_to_uint8(m.numpy()).astype(np.float64) * 254 / 255).round().astype(np.uint8) for m in maps[:max_maps]]
    return indexed_grid(tiles, colormap=colormap, cols=cols, min_tile=64)


@dataclass
class LoadedModel:
    """A model ready for inspection and how to feed it."""

    model: nn.Module
    label: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int | None
    weights: str


def load_model_for_inspect(model: str, weights: str | None = None, image_size: int | None = 224,
                           seed: int = 0) -> LoadedModel:
    """A registry name (with optional ``weights``: a name like ``DEFAULT`` or a state-dict
    file) or a classifier checkpoint (training folder or ``.safetensors``).

    Random initialisation is seeded (``seed``), so pictures of an untrained model repeat.
    ``image_size`` None builds the model at its own size (``model_info.input_size``).
    """
    from visionscale.classify.checkpoint import is_classifier_checkpoint, load_classifier
    from visionscale.classify.data import IMAGENET_MEAN, IMAGENET_STD
    from visionscale.io.weights import load_into, load_state_dict
    from visionscale.modelinfo import model_info
    from visionscale.registry import create, get_model_factory

    p = Path(model).expanduser()
    if (p.exists() or p.suffix == ".safetensors") and model not in _registry_names():
        if not p.exists():
            raise InspectError(f"checkpoint not found: {p}")
        if weights is not None:
            raise InspectError("weights are for registry models; a classifier checkpoint carries its own").about("weights")
        if not is_classifier_checkpoint(p):
            raise InspectError(f"{p} is not a classifier checkpoint (a `visionscale classify train` folder or its "
                               f"model.safetensors); registry models are named, see `visionscale models`")
        net = load_classifier(p)
        cfg = net.config
        return LoadedModel(net, f"{cfg.backbone} classifier ({p.name})", cfg.mean, cfg.std, cfg.image_size,
                           f"trained checkpoint {p}")
    get_model_factory(model)  # UnknownModelError lists the registered names
    size_kw = {} if image_size is None else {"image_size": image_size}
    torch.manual_seed(seed)
    if weights is not None and (Path(weights).expanduser().is_file() or os.sep in weights):
        net = create(model, **size_kw)
        file = Path(weights).expanduser()
        load_into(net, load_state_dict(file), source=str(file))
        desc = f"weights file {file}"
    elif weights is not None:
        try:
            net = create(model, weights=weights, **size_kw)
        except TypeError:
            raise InspectError(f"model {model!r} does not take named weights; give a state-dict file as weights").about(
                "weights") from None
        desc = f"pretrained weights {weights}"
    else:
        net = create(model, **size_kw)
        desc = "random initialisation (no weights given)"
    # The model's own input facts (visionscale.modelinfo): BlazeFace is fed [-1, 1] at 128 px.
    info = model_info(net)
    spec = getattr(net, "weights_spec", None)
    mean = tuple(spec.mean) if spec is not None else info.mean or IMAGENET_MEAN
    std = tuple(spec.std) if spec is not None else info.std or IMAGENET_STD
    h, w = info.input_size
    return LoadedModel(net.eval(), model, mean, std, h if h == w and hasattr(net, "model_info") else None, desc)


def _registry_names() -> set[str]:
    from visionscale.registry import list_models

    return set(list_models())


def default_image() -> np.ndarray:
    """scikit-image's astronaut photo (public domain, NASA), shipped with the package."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[..., :3])


@dataclass
class InspectResult:
    table: LayerTable
    filters_layer: str
    feature_layer: str
    feature_shape: tuple[int, ...]
    files: list[Path]
    weights: str


def inspect_model(model: str, out_dir: str | Path, weights: str | None = None, layer: str | None = None,
                  image: str | Path | None = None, image_size: int | None = None, max_maps: int = 64,
                  overwrite: bool = False) -> InspectResult:
    """Write the layer table, the first layer's filters and one layer's feature maps to ``out_dir``.

    Files: ``layers.csv``, ``layers.md``, ``summary.json``, ``filters.png``, ``input.png``
    (the crop the model saw), ``feature_maps_<layer>.png``. Everything is computed before
    the first file is written, so bad input leaves no partial output; the files appear all
    at once (:class:`~visionscale.io.outputs.OutputDir`), replacing an earlier inspection's.

    Args:
        model: Registry name or classifier checkpoint.
        out_dir: Output folder (created); one holding files an inspection did not write is
            refused before any work unless ``overwrite`` (those files then stay).
        weights: Weights name or state-dict file for a registry model.
        layer: Module name for the feature maps (default: the first conv layer).
        image: Image file (default: scikit-image's astronaut photo).
        image_size: Square input side (default: the model's own, ``model_info.input_size``; 224 if not square).
        max_maps: Most feature-map channels drawn.
        overwrite: Write into a folder that holds other files.
    """
    from visionscale.classify.data import image_to_tensor, load_image, normalize
    from visionscale.classify.model import MAX_IMAGE_SIZE
    from visionscale.errors import check_int
    from visionscale.io.outputs import OutputDir

    check_int("max_maps", max_maps, minimum=1)
    if image_size is not None:
        check_int("image_size", image_size, minimum=8, maximum=MAX_IMAGE_SIZE)
    target = OutputDir(Path(out_dir).expanduser(), kind="inspect", overwrite=overwrite)  # refuses now, not after
    loaded = load_model_for_inspect(model, weights, image_size)
    size = image_size or loaded.image_size or 224
    net = loaded.model
    if hasattr(net, "validate_input_size"):
        try:
            net.validate_input_size(size, size)
        except ValueError as exc:
            raise InspectError(str(exc)) from None
    names = valid_layer_names(net)
    if layer is not None and layer not in names:
        raise _unknown_layer(layer, names)
    conv = first_conv_layer(net)
    if conv is not None and conv[1].in_channels != 3:
        raise InspectError(f"{loaded.label}'s first layer {conv[0]} expects {conv[1].in_channels}-channel input, "
                           f"but images are read as RGB (3 channels)")
    table = layer_table(net, size, name=loaded.label)
    filters_layer, filters_png = filter_grid_png(net, conv=conv)
    # (3, S, S) uint8; a large file is shrunk while still 8-bit (bounded memory)
    crop = load_image(image, size) if image is not None else image_to_tensor(default_image(), size)
    x = normalize(crop[None], loaded.mean, loaded.std)
    feat_layer = layer or filters_layer
    maps = feature_maps(net, x, feat_layer)
    feat_png = feature_grid_png(maps, max_maps=max_maps)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(crop.permute(1, 2, 0).numpy()).save(buf, format="PNG", optimize=True)
    summary = {**table.summary(), "weights": loaded.weights, "filters_layer": filters_layer,
               "feature_layer": feat_layer, "feature_shape": list(maps.shape),
               "image": str(image) if image is not None else "skimage.data.astronaut",
               "mean": list(loaded.mean), "std": list(loaded.std)}
    safe = feat_layer.replace("/", "_")
    outputs = {
        "layers.csv": table.csv_bytes(),
        "layers.md": table.markdown().encode(),
        "summary.json": (json.dumps(summary, indent=2) + "\n").encode(),
        "filters.png": filters_png,
        "input.png": buf.getvalue(),
        f"feature_maps_{safe}.png": feat_png,
    }
    with target as tmp:
        for fname, data in outputs.items():
            (tmp / fname).write_bytes(data)
    files = [target.target / fname for fname in outputs]
    return InspectResult(table, filters_layer, feat_layer, tuple(maps.shape), files, loaded.weights)
