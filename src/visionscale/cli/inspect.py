"""``visionscale inspect MODEL``: layer table, first-layer filters and feature maps.

Registered in ``cli/main.py`` as ``app.command("inspect")(inspect_cmd)``. One library
call (:func:`visionscale.classify.inspect.inspect_model`) plus printing; bad input prints
one line ``error: ...`` on stderr, exits with status 2 and writes nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from visionscale.cli._common import error_line, fail, out
from visionscale.errors import VisionscaleError


def inspect_cmd(
    model: str = typer.Argument(..., help="Registry name (see `visionscale models`) or a classifier checkpoint (folder or .safetensors)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder for layers.csv/.md, summary.json and PNG grids."),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Weights for a registry model: a name (DEFAULT) or a state-dict file [default: random init]."),
    layer: Optional[str] = typer.Option(None, "--layer", "-l", help="Layer whose feature maps to draw, e.g. layer1.0.conv1 [default: first conv]."),
    image: Optional[Path] = typer.Option(None, "--image", "-i", help="Image for the feature maps [default: scikit-image's astronaut photo]."),
    size: Optional[int] = typer.Option(None, "--size", "-s", help="Square input size in px [default: the model's own input size]."),
    max_maps: int = typer.Option(64, help="Most feature-map channels drawn."),
    table: bool = typer.Option(True, "--table/--no-table", help="Print the layer table."),
    as_json: bool = typer.Option(False, "--json", help="Print summary.json to stdout."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a --out folder that holds files visionscale did not write."),
) -> None:
    """Per-layer table (type, output shape, parameters, activation bytes, receptive field), the first layer's filters and one layer's feature maps as PNG grids."""
    from visionscale.classify.inspect import inspect_model

    if size is not None and size < 8:
        fail(f"--size must be at least 8 px, got {size}")
    if max_maps < 1:
        fail(f"--max-maps must be at least 1, got {max_maps}")
    try:  # InspectError, UnknownModelError, weight-file errors (caught here too for apps without CLIGroup)
        result = inspect_model(model, out_dir, weights=weights, layer=layer, image=image, image_size=size,
                               max_maps=max_maps, overwrite=overwrite)
    except VisionscaleError as exc:
        fail(error_line(exc))
    if as_json:
        sys.stdout.write((out_dir / "summary.json").read_text())
        return
    tab = result.table
    if table:
        from rich.table import Table

        t = Table(title=f"{tab.model} at {tuple(tab.input_shape)} ({result.weights})")
        for col in ("component", "layer", "type", "output shape", "params", "activation", "window", "size", "RF", "jump"):
            t.add_column(col, justify="right" if col in ("params", "activation", "RF", "jump") else "left")
        for r in tab.rows:
            size_txt = f"{r.in_size}→{r.out_size}" if r.in_size is not None else ""
            t.add_row(r.component, r.name, r.kind, "×".join(str(s) for s in r.output_shape), f"{r.params:,}",
                      f"{r.activation_bytes / 1024:,.1f} KiB", r.window, size_txt,
                      "" if r.rf is None else str(r.rf), "" if r.jump is None else str(r.jump))
        out.print(t)
    out.print(f"{tab.total_params:,} parameters; activations {tab.activation_sum_bytes / 2**20:,.2f} MiB summed, "
              f"{tab.activation_peak_bytes / 2**20:,.2f} MiB peak (fp32, batch 1)", highlight=False, soft_wrap=True)
    out.print(f"filters of {result.filters_layer}, feature maps of {result.feature_layer} {result.feature_shape}; "
              f"wrote {', '.join(p.name for p in result.files)} to {out_dir}/", highlight=False, soft_wrap=True)


__all__ = ["inspect_cmd"]
