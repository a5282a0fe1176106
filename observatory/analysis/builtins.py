"""The built-in analyses, each a pure function of (model, shared data) on the analysis protocol.

``observatory analyses`` lists them with their variables and options; a job names them in
``analyses = [...]`` and sets their options in a ``[<name>]`` table.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np

from observatory.analysis.ablation import head_ablation_effects
from observatory.analysis.circuits import CIRCUIT_ATTRS, CIRCUIT_VARIABLES, circuit_statistics
from observatory.analysis.heads import attention_patterns as patterns_of
from observatory.analysis.heads import copying_score, head_score_attrs, head_scores
from observatory.analysis.icl import icl_positions, icl_score, loss_positions, token_losses
from observatory.analysis.llc import SGLD, local_learning_coefficient
from observatory.analysis.protocol import Analysis, Heatmap, SharedData, analysis
from observatory.errors import SpecError
from observatory.models import model_weights

HEADS = ("layer", "head")
SCORES = ("induction", "previous_token", "duplicate_token")

# --------------------------------------------------------------------------------------------
# Head scores.


def _head_score_conventions(options: Any) -> list[tuple[str, str, dict[str, bool]]]:
    """(variable prefix, convention, keyword options) of every stored set of scores."""

    def keywords(convention: str) -> dict[str, bool]:
        if convention == "prefix_matching":
            return {}
        return {
            "exclude_bos": options.exclude_bos,
            "exclude_current_token": options.exclude_current_token,
        }

    out = [("", options.convention, keywords(options.convention))]
    if options.transformer_lens_too:
        out.append(("tl_", "transformer_lens", keywords("transformer_lens")))
    return out


def _head_score_variables(options: Any) -> dict[str, tuple]:
    return {
        f"{prefix}{score}_score": HEADS
        for prefix, _, _ in _head_score_conventions(options)
        for score in SCORES
    }


def _head_score_attrs(options: Any, data: SharedData) -> dict[str, Any]:
    _, convention, keywords = _head_score_conventions(options)[0]
    return (
        data.probe.attrs
        | head_score_attrs(convention=convention, **keywords)
        | {"transformer_lens_too": options.transformer_lens_too, "threshold": options.threshold}
    )


def _check_head_score_options(options: Any, where: str) -> None:
    uses_tl = options.convention == "transformer_lens" or options.transformer_lens_too
    if (options.exclude_bos or options.exclude_current_token) and not uses_tl:
        raise SpecError(
            f"{where}.exclude_bos: exclusions apply to the TransformerLens convention only"
        )
    if not 0 < options.threshold < 1:
        raise SpecError(f"{where}.threshold: must be in (0, 1)")


@analysis(
    name="head_scores",
    variables=_head_score_variables,
    attrs=_head_score_attrs,
    validate=_check_head_score_options,
    constants=lambda options, data: {
        "probe_tokens": (("probe_sequence", "probe_position"), data.probe_tokens)
    },
    heatmaps={
        "induction_score": Heatmap("Induction score"),
        "tl_induction_score": Heatmap("Induction score, TransformerLens convention"),
    },
)
def head_scores_analysis(
    model,
    data: SharedData,
    *,
    convention: Literal["prefix_matching", "transformer_lens"] = "prefix_matching",
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    transformer_lens_too: bool = True,
    threshold: float = 0.5,
) -> dict[str, np.ndarray]:
    """Induction, previous-token and duplicate-token scores of every head on the probe.

    ``convention``: ``"prefix_matching"`` (Olsson et al.) or ``"transformer_lens"``
    (``detect_head``, "mul"); ``transformer_lens_too`` also stores ``tl_*`` scores;
    ``exclude_bos`` / ``exclude_current_token`` apply to the TransformerLens convention;
    ``threshold``: induction score at which a head counts as formed (read by the summary).
    """
    options = SimpleNamespace(
        convention=convention,
        exclude_bos=exclude_bos,
        exclude_current_token=exclude_current_token,
        transformer_lens_too=transformer_lens_too,
    )
    patterns = patterns_of(model, data.probe_tokens)
    out = {}
    for prefix, name, keywords in _head_score_conventions(options):
        scores = head_scores(patterns, data.probe_tokens, convention=name, **keywords)
        out |= {f"{prefix}{score}_score": scores[score] for score in SCORES}
    return out


# --------------------------------------------------------------------------------------------
# Weights only (copying, OV and QK circuits), ICL, per-token losses.


@analysis(
    name="copying",
    variables={"copying_score": HEADS},
    attrs=lambda options, data: {"copying_score": "Re(sum eig) / sum |eig| of W_E W_V W_O W_U"},
    heatmaps={"copying_score": Heatmap("Copying score", "RdBu", -1.0, 1.0)},
)
def copying_analysis(model, data: SharedData) -> dict[str, np.ndarray]:
    """Copying score of every head's OV circuit (Elhage et al. 2021)."""
    return {"copying_score": copying_score(model_weights(model))}


@analysis(
    name="circuits",
    variables=dict.fromkeys(CIRCUIT_VARIABLES, HEADS),
    attrs=lambda options, data: dict(CIRCUIT_ATTRS),
    nonfinite=("ov_effective_rank", "qk_effective_rank"),
)
def circuits_analysis(model, data: SharedData) -> dict[str, np.ndarray]:
    """Frobenius norm and effective rank of every head's OV and QK circuits (weights only).

    ``ov_norm``, ``qk_norm``: ``||W_V W_O||_F`` and ``||W_Q W_K^T||_F``;
    ``ov_effective_rank``, ``qk_effective_rank``: ``exp(H(p))``, ``p = sigma / sum sigma``
    over the circuit's singular values (Roy & Vetterli 2007), in ``[1, d_head]``, NaN for a
    zero circuit. Computed in float64 from the ``d_head x d_head`` cores of the factored
    circuits; biases, LayerNorm, the score scale and rotary embeddings are left out.
    """
    return circuit_statistics(model_weights(model))


def _icl_attrs(options: Any, data: SharedData) -> dict[str, Any]:
    early, late = icl_positions(data.held_out_tokens.shape[1])
    return data.held_out_attrs | {
        "icl_early_position": early,
        "icl_late_position": late,
        "icl_convention": "loss at late minus loss at early (Olsson 500 vs 50 of 512)",
    }


@analysis(
    name="icl",
    variables={"icl_score": (), "loss_by_position": ("loss_position",)},
    attrs=_icl_attrs,
)
def icl_analysis(model, data: SharedData) -> dict[str, Any]:
    """In-context-learning score (late minus early loss) and the loss at every position."""
    losses = token_losses(model, data.held_out_tokens)  # [held_out, loss_position]
    early, late = icl_positions(data.held_out_tokens.shape[1])
    return {
        "icl_score": icl_score(losses, early=early, late=late),
        "loss_by_position": losses.mean(axis=0),
    }


@analysis(
    name="token_loss",
    variables={"token_loss": ("held_out",)},
    attrs=lambda options, data: data.held_out_attrs | {"loss_positions_seed": data.held_out_seed},
)
def token_loss_analysis(model, data: SharedData) -> dict[str, np.ndarray]:
    """Loss at one fixed random position per held-out sequence (for the per-token-loss PCA)."""
    losses = token_losses(model, data.held_out_tokens)
    positions = loss_positions(
        n_sequences=len(losses), n_losses=losses.shape[1], seed=data.held_out_seed
    )
    return {"token_loss": losses[np.arange(len(losses)), positions]}


@analysis(
    name="per_token_loss",
    variables={"per_token_loss": ("held_out", "loss_position")},
    attrs=lambda options, data: (
        data.held_out_attrs
        | {
            "held_out_seed": data.held_out_seed,
            "per_token_loss_convention": "per_token_loss[s, t]: loss of token t + 1 of sequence s",
        }
    ),
)
def per_token_loss_analysis(model, data: SharedData) -> dict[str, np.ndarray]:
    """The loss of every token of every held-out sequence (the signal of ``transitions``)."""
    return {"per_token_loss": token_losses(model, data.held_out_tokens)}


# --------------------------------------------------------------------------------------------
# Causal checks.


@analysis(
    name="head_ablation",
    variables={
        "repeated_loss_increase": HEADS,
        "held_out_loss_increase": HEADS,
        "repeated_layer_loss_increase": ("layer",),
        "held_out_layer_loss_increase": ("layer",),
    },
    attrs=lambda options, data: (
        data.probe.attrs
        | data.held_out_attrs
        | {
            "ablation": options.ablation,
            "ablated": "per-head z before W_O (b_O kept)",
            "repeated_positions": "loss on the probe's repeats after the first block",
        }
    ),
)
def head_ablation_analysis(
    model, data: SharedData, *, ablation: Literal["zero", "mean"] = "zero"
) -> dict[str, np.ndarray]:
    """Increase in loss when each head's output (and each layer's) is zero- or mean-ablated.

    ``repeated_loss_increase``: on the probe's repeated blocks (the tokens induction can
    predict); ``held_out_loss_increase``: on every position of the held-out sequences.
    ``repeated_layer_loss_increase``, ``held_out_layer_loss_increase``: the same with every
    head of a layer ablated at once (heads that duplicate a circuit each cost little alone).
    ``ablation``: ``"zero"`` or ``"mean"`` (the head's mean output over the evaluated tokens).
    """
    results = {}
    for prefix, tokens, start in (
        ("repeated", data.probe_tokens, data.probe.block_length),
        ("held_out", data.held_out_tokens, 0),
    ):
        for infix, whole_layers in (("", False), ("_layer", True)):
            results[f"{prefix}{infix}_loss_increase"] = head_ablation_effects(
                model, tokens, ablation=ablation, from_position=start, whole_layers=whole_layers
            )
    return results


def _pattern_tokens(options: Any, data: SharedData) -> dict[str, tuple]:
    if options.sequence >= len(data.probe_tokens):
        raise SpecError(
            f"attention_patterns.sequence: {options.sequence} is not a probe sequence "
            f"(the probe has {len(data.probe_tokens)})"
        )
    return {"pattern_tokens": (("probe_query",), data.probe_tokens[options.sequence])}


def _check_sequence(options: Any, where: str) -> None:
    if options.sequence < 0:
        raise SpecError(f"{where}.sequence: must be >= 0")


@analysis(
    name="attention_patterns",
    variables={"attention_pattern": (*HEADS, "probe_query", "probe_key")},
    attrs=lambda options, data: data.probe.attrs | {"sequence": options.sequence},
    validate=_check_sequence,
    constants=_pattern_tokens,
)
def attention_patterns_analysis(model, data: SharedData, *, sequence: int = 0) -> dict:
    """Every head's attention pattern on one probe sequence (``sequence``: its index).

    ``attention_pattern[layer, head, probe_query, probe_key]``; the sequence's tokens are
    stored beside it as ``pattern_tokens``.
    """
    tokens = data.probe_tokens[sequence : sequence + 1]
    return {"attention_pattern": patterns_of(model, tokens)[:, 0]}  # [layer, head, q, k]


# --------------------------------------------------------------------------------------------
# Developmental stages.


@analysis(
    name="llc",
    options=SGLD,
    variables=lambda options: {
        "llc": (),
        "llc_std": (),
        "llc_init_loss": (),
        "llc_loss_trace": (("sgld_step", options.burnin + options.draws),),
    },
    attrs=lambda options, data: (
        data.held_out_attrs
        | dataclasses.asdict(options)
        | {"estimator": "devinterp SGLD: n_beta * (mean SGLD loss - loss at the checkpoint)"}
    ),
)
def llc_analysis(model, data: SharedData, **settings: Any) -> dict[str, Any]:
    """Local learning coefficient by SGLD (devinterp), on the held-out sequences.

    The options are the sampler's settings (:class:`~observatory.analysis.llc.SGLD`: ``lr``,
    ``n_beta``, ``localization``, ``chains``, ``draws``, ``burnin``, ``batch_size``, ``seed``);
    the seed fixes the chains and minibatch order, so every checkpoint is estimated with the
    same noise. ``llc_loss_trace[sgld_step]`` (mean over chains) shows whether the chains
    converged: flat after burn-in (a weaker ``localization`` or a larger ``lr`` let the chains
    drift off). Needs ``.[llc]``.
    """
    return local_learning_coefficient(model, data.held_out_tokens, SGLD(**settings))


BUILTINS: dict[str, Analysis] = {
    a.name: a
    for a in (
        head_scores_analysis,
        copying_analysis,
        circuits_analysis,
        icl_analysis,
        token_loss_analysis,
        per_token_loss_analysis,
        head_ablation_analysis,
        attention_patterns_analysis,
        llc_analysis,
    )
}
DEFAULT_ANALYSES = ("head_scores", "copying", "circuits", "icl", "token_loss", "per_token_loss")
