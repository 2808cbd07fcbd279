"""Helpers shared by the anomaly CLI tests (importable: pytest puts this folder on sys.path)."""

from __future__ import annotations

import typer

from visionscale.cli import ad


def ad_cli() -> typer.Typer:
    """A root app with only the ``ad`` commands, as ``visionscale ad ...`` sees them, without the
    root's logging handler (so ``--json`` output stays parseable in ``CliRunner``'s mixed output)."""
    root = typer.Typer()
    root.add_typer(ad.app, name="ad")
    return root
