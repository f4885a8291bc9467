"""Names a package exports but imports on first use (PEP 562), so that importing the package (e.g. for
`visroute --help`) does not import torch, and so that a package can export names of a module that imports it."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `package`: name -> the module that defines it (`exports`); the first use
    imports that module and keeps the value in the package's namespace."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
