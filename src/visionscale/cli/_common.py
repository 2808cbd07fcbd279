"""What every ``visionscale`` sub-command shares: the two consoles and how errors are printed.

Results go to stdout (``out``), notes, warnings and errors to stderr (``err``). ``fail`` prints
one line ``error: <message>`` (the message is escaped, so paths with ``[`` stay intact) and
exits with status 2: the CLI's code for bad input.
"""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def split_csv(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [t.strip() for t in text.split(",") if t.strip()]


def note_runner(forward) -> None:
    """``note: running <backend> <precision> on <device>[, provider P]`` on stderr when ``forward``
    is a :class:`visionscale.runtime.Runner` or its ``runtime_info`` (nothing for eager FP32)."""
    info = forward if isinstance(forward, dict) else getattr(forward, "info", None)
    if isinstance(info, dict) and (info.get("backend"), info.get("precision")) != ("eager", "fp32"):
        provider = f", provider {info['provider']}" if "provider" in info else ""
        what = f"running {info['backend']} {info['precision']} on {info['device']}{provider}"
        err.print(f"note: {escape(what)}", highlight=False, soft_wrap=True)
