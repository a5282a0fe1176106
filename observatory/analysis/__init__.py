"""Pure analysis functions: one checkpoint's model or weights plus probe data in, numpy out.

No I/O here: the batch runner calls these per checkpoint and stores the results, with the
conventions each one records (``attrs``) as attributes.
"""

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
    "Bump",
    "Emergence",
    "HeadMatch",
    "LossPCA",
    "Probe",
    "attention_patterns",
    "bootstrap_ci",
    "compiled_induction_model",
    "copying_score",
    "emergence",
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
