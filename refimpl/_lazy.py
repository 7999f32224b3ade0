"""Lazy exports for package ``__init__`` files (PEP 562), so that the NumPy side imports
without torch.

``import refimpl.cbam.numpy_forward`` runs ``refimpl/__init__.py`` and
``refimpl/cbam/__init__.py`` first; if those imported the registry or the PyTorch modules,
the NumPy oracle could not run where torch is absent (DESIGN.md). A package lists its
torch-side names here instead; each is imported on first access, and ``__all__``,
``from package import name`` and ``dir()`` work as before.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``, resolving ``exports`` on demand.

    Args:
        package: the package's ``__name__``.
        exports: ``{name: module}``: the attribute ``name`` is ``module.name``, imported
            the first time it is asked for (then cached in the package's namespace). A
            name mapped to its own module path (``{"registry": "refimpl.registry"}``) is
            that submodule.
        namespace: the package's ``globals()``.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(exports[name])
        value = module if exports[name] == f"{package}.{name}" else getattr(module, name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
