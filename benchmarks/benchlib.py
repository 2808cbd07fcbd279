"""What every benchmark script shares: a description of the machine and updating its own
section of docs/benchmarks.md.

A script's section sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``; rerunning the
script with ``--write`` replaces only that section (atomically), and the first run appends it
under a heading.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from visionscale.io.atomic import write_atomic

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"


def machine() -> str:
    """CPU model, cores, torch version and threads, Python, and the load when the run started."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}; load average {load:.1f} at the start")


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def update_section(name: str, title: str, body: str, doc: Path = DOC) -> Path:
    """Put ``body`` between the ``name`` markers of ``doc`` (appending ``## title`` and the
    markers when the section is new) and return the file's path."""
    begin, end = markers(name)
    block = f"{begin}\n\n{body.strip()}\n\n{end}"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n{block}\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(doc, text.encode())
    return doc
