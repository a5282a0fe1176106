"""Attribution along the exact training trajectory: which updates and which training windows
moved a quantity of the model.

A target (:mod:`~observatory.attribution.targets`, ``@obs.target``) is a differentiable scalar
of a model; :func:`attribute` replays a span of a run and splits the target's change into one
term per update (:mod:`~observatory.attribution.steps`) and, optionally, each term over the
windows of its batch (:mod:`~observatory.attribution.examples`), storing the result in the
run; :func:`attribution` reads it back and :func:`top_examples` ranks the windows.

The package itself is callable: ``obs.attribution(store, ...)`` is :func:`attribution`.
"""

import sys
import types

from observatory._lazy import lazy_attributes

_LAZY = {
    "results": "attribute attribution format_attribution top_examples",
    "dynamics": "measure_dynamics format_dynamics",
    "targets": "BUILTINS Target target",
}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
__all__ = sorted(name for names in _LAZY.values() for name in names.split())


class _CallableModule(types.ModuleType):
    """This package, callable as the reader :func:`attribution` (``obs.attribution(...)``)."""

    def __call__(self, *args, **kwargs):
        return self.attribution(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
