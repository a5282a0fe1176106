"""Pure analysis functions: one checkpoint's model or weights plus probe data in, numpy out.

No I/O here: analyses follow one protocol (:func:`analysis`, in ``protocol.py``; the built-ins
in ``builtins.py``), and the job runner (:mod:`observatory.jobs.analyze`) calls them per
checkpoint and stores the results, with the conventions each one records as attributes.

The package itself is callable: ``@obs.analysis(variables=...)`` is :func:`analysis`.
"""

import sys
import types
from importlib import import_module

# Public names, imported from their module on first use: importing one analysis module (the
# trainer needs ``phase.final_loss``) does not import scipy, ruptures and every other analysis.
_LAZY = {
    **dict.fromkeys(("ablated_losses", "head_ablation_effects"), "ablation"),
    "compiled_induction_model": "compiled",
    **dict.fromkeys(
        ("attention_patterns", "copying_score", "head_score_attrs", "head_scores"), "heads"
    ),
    **dict.fromkeys(
        ("LossPCA", "icl_positions", "icl_score", "loss_pca", "loss_positions", "token_losses"),
        "icl",
    ),
    **dict.fromkeys(("Bump", "Emergence", "emergence", "loss_bump"), "phase"),
    **dict.fromkeys(("SGLD", "local_learning_coefficient"), "llc"),
    **dict.fromkeys(("Probe", "repeated_tokens"), "probes"),
    **dict.fromkeys(("Analysis", "Heatmap", "SharedData", "analysis"), "protocol"),
    **dict.fromkeys(
        (
            "HeadMatch",
            "bootstrap_ci",
            "linear_cka",
            "match_heads",
            "seed_summary",
            "t_interval",
            "variance_split",
        ),
        "stats",
    ),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _CallableModule(types.ModuleType):
    """This package, callable as the :func:`analysis` decorator (``@obs.analysis(...)``)."""

    def __call__(self, **kwargs):
        return self.analysis(**kwargs)


sys.modules[__name__].__class__ = _CallableModule
