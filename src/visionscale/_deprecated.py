"""One way to keep a moved public name importable from its old module for one release.

``__getattr__ = moved(__name__, {"old": "new.module:new_name", ...})`` in the old module: reading
``old`` warns with a ``DeprecationWarning`` that names the new place, then returns the object
there. ``"*": "new.module"`` forwards every other public name to that module (a module moved as a
whole). The new module is imported only when an old name is used, so a shim adds no import-time
dependency (and, for the runtime core, no upward one).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable


def moved(old_module: str, table: dict[str, str], lazy: dict[str, str] | None = None) -> Callable[[str], object]:
    """A module-level ``__getattr__`` that forwards the names in ``table`` with a warning, and
    the names in ``lazy`` (current names, imported on first use) without one."""

    def __getattr__(name: str) -> object:
        if lazy and name in lazy:
            module, _, attr = lazy[name].partition(":")
            return getattr(importlib.import_module(module), attr)
        target = table.get(name)
        if target is None and "*" in table and not name.startswith("_"):
            target = f"{table['*']}:{name}"
        if target is None:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        module, _, attr = target.partition(":")
        warnings.warn(f"{old_module}.{name} moved to {module}.{attr}; the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), attr)

    return __getattr__
