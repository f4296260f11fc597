"""Lazy package exports (PEP 562), shared by the subpackages that use them.

A package ``__init__`` declares ``_EXPORTS`` (exported name -> submodule that defines it) and
installs the module-level ``__getattr__`` / ``__dir__`` made here::

    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

``import package`` then imports no submodule; ``package.<name>`` imports the submodule that
defines ``<name>`` on first access and caches the value in the package namespace. Type
checkers see the exports through ``from .module import name as name`` lines in a
``TYPE_CHECKING`` block next to ``_EXPORTS``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module-level ``__getattr__`` and ``__dir__`` for lazily exported names.

    Parameters
    ----------
    package:
        The package's ``__name__``.
    exports:
        Exported name -> name of the submodule (relative to ``package``) that defines it.
    namespace:
        The package's ``globals()``; resolved names are cached there, so each submodule is
        looked up once per name.
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
