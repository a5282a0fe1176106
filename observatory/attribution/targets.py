"""Attribution targets: differentiable scalars of a model, the quantities attribution explains.

A target is a function ``f(model, data, *, option=default, ...)`` decorated with
:func:`target` (``@obs.target``): it gets the model (eval mode, gradients on) and the
analyses' :class:`~observatory.analysis.protocol.SharedData` (probe, held-out tokens) and
returns a 0-d torch tensor that requires grad.  Its keyword-only options are validated like
analysis options.  The built-ins (:data:`BUILTINS`) are a head's induction and previous-token
scores, the loss on the probe's repeated part and the held-out loss; a user's own target is
named ``"file.py:name"`` or ``"package.module:name"``, resolved like analyses
(:func:`observatory.jobs.resolve.resolve`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from observatory.analysis.heads import prefix_matching_score
from observatory.analysis.protocol import Plugin, SharedData, check_signature, options_class
from observatory.errors import AnalysisError, SpecError
from observatory.jobs.resolve import read_source, resolve


class TargetError(AnalysisError):
    """A target failed, or returned something other than a differentiable scalar."""


@dataclass(frozen=True, eq=False)
class Target(Plugin):
    """A registered target; calling it calls the function (see :func:`target`)."""

    NOUN: ClassVar[str] = "target"


def target(function: Callable) -> Target:
    """Declare a target: a differentiable scalar of (model, shared data), to attribute.

    Parameters
    ----------
    function
        ``function(model, data, *, option=default, ...) -> torch.Tensor`` (0-d, requiring
        grad); every keyword-only option needs an annotation and a default.

    Returns
    -------
    Target

    Raises
    ------
    SpecError
        On a function whose parameters beyond ``(model, data)`` are not keyword-only options.

    Examples
    --------
    >>> @obs.target
    ... def loss_on_last_token(model, data, *, n: int = 8):
    ...     tokens = torch.as_tensor(data.held_out_tokens[:n])
    ...     return model(tokens).logits[:, -2].log_softmax(-1)[..., 0].mean()
    """
    name = getattr(function, "__name__", "")
    if not callable(function) or not str(name).isidentifier():
        raise SpecError(f"@target: {name!r} is not a function with an identifier name")
    check_signature(function, name, None, noun="target")
    return Target(name=name, function=function, options=options_class(function, noun="target"))


# --------------------------------------------------------------------------------------------
# The built-in targets.


def _head_pattern(model, tokens: np.ndarray, layer: int, head: int) -> torch.Tensor:
    """``pattern[batch, query, key]`` of one head on ``tokens``, with gradients."""
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    if not (0 <= layer < n_layers and 0 <= head < n_heads):
        raise TargetError(f"no head {layer}.{head}: the model has {n_layers}x{n_heads} heads")
    out = model(torch.as_tensor(tokens, dtype=torch.long), output_attentions=True)
    return out.attentions[layer][:, head]


@target
def induction_score(model, data: SharedData, *, layer: int = 0, head: int = 0) -> torch.Tensor:
    """The head's induction score on the probe (prefix matching, Olsson et al.)."""
    pattern = _head_pattern(model, data.probe_tokens, layer, head)
    return prefix_matching_score(pattern, data.probe_tokens, score="induction")


@target
def previous_token_score(model, data: SharedData, *, layer: int = 0, head: int = 0) -> torch.Tensor:
    """The head's previous-token score on the probe (prefix matching)."""
    pattern = _head_pattern(model, data.probe_tokens, layer, head)
    return prefix_matching_score(pattern, data.probe_tokens, score="previous_token")


def _token_losses(model, tokens: np.ndarray) -> torch.Tensor:
    """``loss[batch, pos - 1]`` (float64): next-token cross-entropy, with gradients."""
    ids = torch.as_tensor(tokens, dtype=torch.long)
    log_probs = model(ids).logits.double()[:, :-1].log_softmax(dim=-1)
    return -log_probs.gather(-1, ids[:, 1:, None])[..., 0]


@target
def probe_repeated_loss(model, data: SharedData) -> torch.Tensor:
    """The mean loss on the probe's repeated part (every token after the first block)."""
    losses = _token_losses(model, data.probe_tokens)  # loss[:, t] predicts token t + 1
    return losses[:, data.probe.block_length :].mean()  # tokens 1 + block_length, ...


@target
def held_out_loss(model, data: SharedData) -> torch.Tensor:
    """The mean next-token loss on the held-out sequences."""
    return _token_losses(model, data.held_out_tokens).mean()


BUILTINS: dict[str, Target] = {
    t.name: t for t in (induction_score, previous_token_score, probe_repeated_loss, held_out_loss)
}


# --------------------------------------------------------------------------------------------
# Resolving and calling a target.


@dataclass(frozen=True, eq=False)
class ChosenTarget:
    """A target with its options, and what travels to workers: its reference and source."""

    target: Target | None  # None while it travels by reference (see portable)
    options: Any
    ref: str | None  # None: a Target object given in Python (it travels as itself)
    source: str | None

    @property
    def name(self) -> str:
        return self.target.name if self.target is not None else self.ref.rpartition(":")[2]

    def parameters(self) -> dict[str, Any]:
        """What is stored with the results: the name, options and a user target's hash."""
        out = {"target": self.name, "target_options": dataclasses.asdict(self.options)}
        if self.ref not in BUILTINS:
            out["target_sha256"] = self.target.source_hash()
        return out

    def portable(self) -> ChosenTarget:
        """What to send to a worker: a target named by reference travels as its reference (and
        a file's source), not as the object."""
        return self if self.ref is None else dataclasses.replace(self, target=None)

    def on_worker(self) -> ChosenTarget:
        """This target as a worker rebuilds it (a file's target from its shipped source)."""
        if self.ref is None:
            return self
        found = resolve(self.ref, self.source, builtins=BUILTINS, kind=Target)
        return dataclasses.replace(self, target=found)


def choose(chosen: str | Target, options: Mapping[str, Any] | None) -> ChosenTarget:
    """A target by reference (built-in name, ``file.py:name``, ``module:name``) or object,
    with its options validated.

    Raises
    ------
    SpecError
        On an unknown target, a bad reference or a bad option (one line).
    """
    if isinstance(chosen, Target):
        ref, source, found = None, None, chosen
    elif isinstance(chosen, str):
        ref, source = chosen, read_source(chosen, "target")
        found = resolve(chosen, source, builtins=BUILTINS, kind=Target)
    else:
        raise SpecError(
            f"target: expected a name or an @obs.target function, got {type(chosen).__name__}"
        )
    where = f"target {found.name!r}"
    picked = found.parse_options(options if options is not None else {}, where)
    return ChosenTarget(target=found, options=picked, ref=ref, source=source)


def value_and_gradient(
    chosen: ChosenTarget, model, data: SharedData, where: str
) -> tuple[float, torch.Tensor]:
    """The target's value and its gradient by the weights, flattened (float64).

    The model is evaluated in eval mode and restored; the caller's RNG stream and the
    parameters' ``.grad`` are left untouched (gradients come from ``torch.autograd.grad``).

    Raises
    ------
    TargetError
        One line, if the target raises, returns anything but a 0-d tensor, or a value that
        does not depend differentiably on the weights.
    """
    params = [p for _, p in model.named_parameters()]
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            value = _call(chosen, model, data, where)
            grads = torch.autograd.grad(value, params, allow_unused=True)
    finally:
        model.train(was_training)
    flat = [
        (torch.zeros_like(p) if g is None else g).reshape(-1).double()
        for p, g in zip(params, grads, strict=True)
    ]
    return float(value.detach()), torch.cat(flat)


def _call(chosen: ChosenTarget, model, data: SharedData, where: str) -> torch.Tensor:
    try:
        value = chosen.target.function(model, data, **dataclasses.asdict(chosen.options))
    except TargetError:
        raise
    except Exception as err:  # the user's code: report it as one line
        message = f"{type(err).__name__}: {err}".splitlines()[0]
        raise TargetError(f"{where} failed: {message}") from None
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise TargetError(f"{where} returned {shape}, not a 0-d torch tensor")
    if not value.requires_grad:
        raise TargetError(
            f"{where} returned a value that does not require grad (computed under no_grad, "
            "detached, or from numpy?)"
        )
    if not torch.isfinite(value):
        raise TargetError(f"{where} returned {float(value)}, not a finite number")
    return value
