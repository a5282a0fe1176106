"""Pure analysis functions: one checkpoint's model or weights plus probe data in, numpy out.

No I/O here: analyses follow one protocol (:func:`analysis`, in ``protocol.py``; the built-ins
in ``builtins.py``), and the job runner (:mod:`observatory.jobs`) calls them per checkpoint and
stores the results, with the conventions each one records as attributes.

The package itself is callable: ``@obs.analysis(variables=...)`` is :func:`analysis`.
"""

import sys
import types

from observatory.analysis.ablation import ablated_losses, head_ablation_effects
from observatory.analysis.compiled import compiled_induction_model
from observatory.analysis.heads import (
    attention_patterns,
    copying_score,
    head_score_attrs,
    head_scores,
)
from observatory.analysis.icl import (
    LossPCA,
    icl_positions,
    icl_score,
    loss_pca,
    loss_positions,
    token_losses,
)
from observatory.analysis.phase import Bump, Emergence, emergence, loss_bump
from observatory.analysis.probes import Probe, repeated_tokens
from observatory.analysis.protocol import Analysis, SharedData, analysis
from observatory.analysis.stats import (
    HeadMatch,
    bootstrap_ci,
    linear_cka,
    match_heads,
    seed_summary,
    t_interval,
    variance_split,
)

__all__ = [
    "Analysis",
    "Bump",
    "Emergence",
    "HeadMatch",
    "LossPCA",
    "Probe",
    "SharedData",
    "ablated_losses",
    "analysis",
    "attention_patterns",
    "bootstrap_ci",
    "compiled_induction_model",
    "copying_score",
    "emergence",
    "head_ablation_effects",
    "head_score_attrs",
    "head_scores",
    "icl_positions",
    "icl_score",
    "linear_cka",
    "loss_bump",
    "loss_pca",
    "loss_positions",
    "match_heads",
    "repeated_tokens",
    "seed_summary",
    "t_interval",
    "token_losses",
    "variance_split",
]


class _CallableModule(types.ModuleType):
    """This package, callable as the :func:`analysis` decorator (``@obs.analysis(...)``)."""

    def __call__(self, **kwargs):
        return analysis(**kwargs)


sys.modules[__name__].__class__ = _CallableModule
