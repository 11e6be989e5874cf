"""Packages whose public names load on first use (PEP 562), so that importing one is cheap.

``fungi_ops`` keeps torch out of processes that only need its errors or spec (the
pipeline's driver); ``fungi_ops.eval`` keeps scikit-learn, matplotlib and scipy out of
processes that only read or write tables (the pipeline's writers).
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, whose public names are ``exports`` (name -> defining module).

    A name's module is imported when the name is first asked for; the value is then kept in
    the package's namespace, so later lookups are plain attribute reads.
    """
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
