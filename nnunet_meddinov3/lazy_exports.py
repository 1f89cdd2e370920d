"""Package exports imported on first use (PEP 562), so a package can name its public API in its
``__init__`` while a light submodule of it (plain-data configs, the registry) stays importable without
the heavy ones (torch, timm): the command line's ``--help`` reads those."""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]], namespace: dict
                 ) -> tuple[Callable[[str], object], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package``, whose ``exports`` map each submodule to the
    names it provides; ``namespace`` is the package's ``globals()``, where a name is kept once imported."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__, sorted(where)
