"""Public names of a package imported on first use: each stage's ``__init__`` declares its interface this way.

A package lists what it offers (``__all__``) and where each name is defined; nothing is imported until a name
is used, so importing a config module (which imports its package) stays light and ``msnoop --help`` loads no
stage.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose public names live in its submodules.

    Args:
        package: The package's ``__name__``.
        exports: Public name -> submodule defining it (``{"RunDir": "rundir"}``).

    Returns:
        Functions to assign to the package's ``__getattr__`` and ``__dir__``; an unknown name raises
        ``AttributeError`` naming the package.
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
