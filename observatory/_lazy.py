"""Names a package imports from its modules on first use, so importing the package stays cheap."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from importlib import import_module


def lazy_attributes(
    package: str, modules: Mapping[str, str], *, submodules: Iterable[str] = ()
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of a package with lazy public names.

    Parameters
    ----------
    package
        The package's ``__name__``.
    modules
        Each module mapped to the public names it defines (separated by spaces); a module is
        relative to ``package`` (``"heads"``) or absolute (``"observatory.query"``).
    submodules
        Subpackages or modules that resolve as attributes themselves (``obs.store``).
    """
    submodules = tuple(submodules)
    names = {
        name: where if where.startswith("observatory") else f"{package}.{where}"
        for where, defined in modules.items()
        for name in defined.split()
    }

    def __getattr__(name: str) -> object:
        if name in names:
            return getattr(import_module(names[name]), name)
        if name in submodules:
            return import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*import_module(package).__dict__, *names, *submodules})

    return __getattr__, __dir__
