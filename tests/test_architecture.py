"""Import direction: the runtime core (runner, backends, precision, export, outputs) knows no domain.

Walks the source with ``ast``, so a lazy import inside a function counts as much as one at the
top of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "visionscale"
DOMAINS = ("anomaly", "classify", "detection", "face", "profiling", "study")
ABOVE_RUNTIME = DOMAINS + ("deploy", "cli")
# Deprecated shims that forward old names to their new home above the domains, and nothing else.
FORWARDS = {"runtime/bench.py": "visionscale.deploy", "runtime/tasks.py": "visionscale.deploy",
            "runtime/__init__.py": "visionscale.deploy"}


def imports(path: Path, src: Path = SRC) -> list[tuple[int, str]]:
    """``(line, absolute module)`` for every import in ``path`` (a file under ``src``, the
    ``visionscale`` folder), relative ones resolved."""
    package = ".".join(path.relative_to(src.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # `from visionscale import anomaly` imports the package too
            found += [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return found


def _violations(files, forbidden: tuple[str, ...], allowed: dict[str, str] | None = None,
                src: Path = SRC) -> list[str]:
    bad = []
    for path in files:
        rel = path.relative_to(src).as_posix()
        for line, module in imports(path, src):
            parts = module.split(".")
            if len(parts) < 2 or parts[0] != "visionscale" or parts[1] not in forbidden:
                continue
            if allowed and allowed.get(rel) and (module + ".").startswith(allowed[rel] + "."):
                continue
            bad.append(f"{rel}:{line} imports {module}")
    return bad


def test_runtime_core_imports_no_domain():
    files = sorted((SRC / "runtime").rglob("*.py"))
    assert files, SRC
    assert _violations(files, ABOVE_RUNTIME, FORWARDS) == []


def test_model_metadata_module_is_core():
    """``modelinfo`` is asked by every layer, so it imports no layer."""
    assert [m for _, m in imports(SRC / "modelinfo.py") if m.startswith("visionscale")] == []


def test_the_walk_sees_lazy_and_relative_imports(tmp_path):
    # guard the guard: an import inside a function and a relative one are both found
    src = tmp_path / "visionscale"
    (src / "runtime").mkdir(parents=True)
    probe = src / "runtime" / "probe.py"
    probe.write_text("def f():\n    from ..anomaly import predict\n    import visionscale.face.api\n")
    found = {m for _, m in imports(probe, src)}
    assert {"visionscale.anomaly", "visionscale.anomaly.predict", "visionscale.face.api"} <= found
    assert len(_violations([probe], ABOVE_RUNTIME, src=src)) == 3
