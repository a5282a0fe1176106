"""Pure analysis functions: one checkpoint's model or weights plus probe data in, numpy out.

No I/O here: analyses follow one protocol (:func:`analysis`, in ``protocol.py``; the built-ins
in ``builtins.py``), and the job runner (:mod:`observatory.jobs.analyze`) calls them per
checkpoint and stores the results, with the conventions each one records as attributes.

The package itself is callable: ``@obs.analysis(variables=...)`` is :func:`analysis`.
"""

import sys
import types

from observatory._lazy import lazy_attributes

# Public names, imported from their module on first use: importing one analysis module (the
# trainer needs ``phase.final_loss``) does not import scipy, ruptures and every other analysis.
_LAZY = {
    "ablation": "ablated_losses head_ablation_effects",
    "circuits": "circuit_statistics effective_rank factored_singular_values",
    "compiled": "compiled_induction_model",
    "heads": "attention_patterns copying_score head_score_attrs head_scores",
    "icl": "LossPCA icl_positions icl_score loss_pca loss_positions token_losses",
    "phase": "Bump Emergence emergence loss_bump",
    "llc": "SGLD local_learning_coefficient",
    "probes": "Probe repeated_tokens",
    "protocol": "Analysis Heatmap SharedData analysis",
    "stats": "HeadMatch bootstrap_ci linear_cka match_heads seed_summary t_interval variance_split",
}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
__all__ = sorted(name for names in _LAZY.values() for name in names.split())


class _CallableModule(types.ModuleType):
    """This package, callable as the :func:`analysis` decorator (``@obs.analysis(...)``)."""

    def __call__(self, **kwargs):
        return self.analysis(**kwargs)


sys.modules[__name__].__class__ = _CallableModule
