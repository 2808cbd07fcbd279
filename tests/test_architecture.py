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
# Files allowed one upward import, to the module they forward to. The runtime's deprecated shims
# (runtime.bench, runtime.tasks) forward by name through visionscale._deprecated.moved, so they
# need none.
FORWARDS: dict[str, str] = {}


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


# -- the whole layering (docs/architecture.md) ---------------------------------------------

CORE = ("errors", "device", "io", "registry", "modelinfo", "components", "nn", "_deprecated", "tiling")
LAYER = {**{c: 0 for c in CORE}, "runtime": 1, "study": 2, "anomaly": 3, "classify": 3, "detection": 3,
         "face": 3, "integrations": 4, "deploy": 4, "serve": 4, "bundle": 4, "engines": 4, "cli": 5}
# Deprecated aliases forward old names to their new home for one release: their edge to that
# home is not a dependency (nothing new is built on it), their other imports are.
SHIMS = {"profiling/__init__.py": "visionscale.study", **FORWARDS}
MODEL_FILES = ("nn/resnet.py", "nn/pdn.py", "nn/unet.py", "anomaly/patchcore.py", "anomaly/efficientad.py",
               "anomaly/ddad.py", "face/blazeface.py", "face/dlib_resnet.py", "face/dlib_embedder.py",
               "detection/model.py", "classify/model.py")
NOT_FOR_MODELS = ("train", "_fit", "fit", "plots", "predict", "data", "cli", "deploy", "study", "runtime")


def _module_of(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the visionscale modules it imports (lazy imports included, shims left out)."""
    files = {_module_of(p, src): p for p in src.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        forward = SHIMS.get(path.relative_to(src).as_posix())
        deps = set()
        for _, module in imports(path, src):
            if forward and (module + ".").startswith(forward + "."):
                continue
            while module and module not in files:
                module = module.rpartition(".")[0]
            if module and module != name:
                deps.add(module)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_no_import_cycles_in_src():
    assert _cycles(_graph()) == []


def test_imports_point_down_the_layers():
    bad = []
    for module, deps in _graph().items():
        top = module.split(".")[1] if "." in module else ""
        for dep in deps:
            other = dep.split(".")[1] if "." in dep else ""
            if top not in LAYER or other not in LAYER or top == other:
                continue
            if LAYER[other] > LAYER[top] or (LAYER[other] == LAYER[top] and LAYER[top] == 3):
                bad.append(f"{module} imports {dep}")
    assert bad == []


def test_model_files_import_no_training_data_plotting_or_cli():
    bad = []
    for rel in MODEL_FILES:
        for line, module in imports(SRC / rel):
            leaf = module.split(".")
            if leaf[0] == "visionscale" and any(part in NOT_FOR_MODELS or part.endswith(("_train", "_fit"))
                                                for part in leaf[1:]):
                bad.append(f"{rel}:{line} imports {module}")
    assert bad == []


def test_the_cycle_finder_finds_a_lazy_cycle(tmp_path):
    src = tmp_path / "visionscale"
    (src / "a").mkdir(parents=True)
    (src / "a" / "x.py").write_text("import visionscale.a.y\n")
    (src / "a" / "y.py").write_text("def f():\n    from visionscale.a import x\n")
    assert _cycles(_graph(src)) == [["visionscale.a.x", "visionscale.a.y"]]
