"""Per-example attribution: each step's term split over the training windows of its batch.

For the update ``k`` (from the weights after ``k`` updates to those after ``k + 1``) on a batch
of ``B`` windows, with ``g_{k,i}`` the gradient of window ``i``'s training loss at ``theta_k``
(``torch.func``: ``vmap(grad(functional_call))``; the batch loss is their mean), AdamW's update
is ``-lr_k * (m_hat_k / (sqrt(v_hat_k) + eps) + weight_decay * theta_k)`` with the first moment
``m_k = beta1 * m_{k-1} + (1 - beta1) * clip_k * mean_i g_{k,i}``.  The part of the update due
to window ``i`` in this step is therefore::

    u_{k,i} = -lr_k * (1 - beta1) / (1 - beta1^t) * clip_k * g_{k,i} / B / (sqrt(v_hat_k) + eps)

elementwise, with ``t = k + 1`` AdamW's step count, ``v_hat_k = v_k / (1 - beta2^t)`` the
bias-corrected second moment *after* this step's update (read from the replayed optimizer)
and ``clip_k = min(1, grad_clip / (grad_norm_k + 1e-6))`` the step's clip factor (from the
recorded gradient norm, as ``clip_grad_norm_`` computes it).  Then::

    example_contribution[k, i] = <(grad f(theta_k) + grad f(theta_{k+1})) / 2, u_{k,i}>

with the same averaged target gradient as the step's term, and ``carried[k] =
step_contribution[k] - sum_i example_contribution[k, i]``.  What this ignores, and ``carried``
holds: the momentum ``beta1 * m_{k-1}`` carried into this step from earlier batches (each
window's gradient keeps moving the weights in the following steps through ``m``; here it
counts only in the step where it was computed), weight decay, and the effect of window ``i``
on ``v`` (the preconditioner is taken as given; the update is not linear in the examples).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from observatory.spec import RunSpec
from observatory.train.step import clip_factor


def per_example_gradients(model, tokens: torch.Tensor) -> torch.Tensor:
    """The gradient of each window's training loss by the weights, flattened.

    Parameters
    ----------
    model
        The model, in the mode training uses; it is not changed.
    tokens
        ``tokens[batch, context]``: the step's windows.

    Returns
    -------
    torch.Tensor
        ``grads[batch, n_parameters]`` (float64), parameters in ``named_parameters`` order.
    """
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(weights, window):
        ids = window[None]
        return functional_call(model, weights, (), {"input_ids": ids, "labels": ids}).loss

    with torch.random.fork_rng(devices=[]):
        grads = vmap(grad(loss), in_dims=(None, 0))(params, tokens)
    return torch.cat([grads[name].reshape(len(tokens), -1).double() for name in params], dim=1)


class ExampleTerms:
    """Per-example terms of the steps of a replay: :meth:`begin` at ``theta_k`` (per-example
    gradients), :meth:`finish` after the update (the optimizer's ``v`` and the target's
    averaged gradient).

    Parameters
    ----------
    spec
        The run spec (clipping threshold).
    grad_norms
        ``grad_norm[step - first]``: the recorded gradient norms before clipping.
    first
        The step of ``grad_norms[0]``.
    """

    def __init__(self, spec: RunSpec, grad_norms: np.ndarray, first: int):
        self._clip, self._norms, self._first = spec.optimizer.grad_clip, grad_norms, first
        self._grads: torch.Tensor | None = None

    def begin(self, model, tokens: torch.Tensor) -> None:
        """Take the per-example gradients of the step's batch at the current weights."""
        self._grads = per_example_gradients(model, tokens)

    def finish(self, step: int, model, optimizer, target_gradient: torch.Tensor) -> np.ndarray:
        """``example_contribution[step, :]`` (float64), after the optimizer's update.

        ``target_gradient`` is the averaged gradient of the target at both ends of the step.
        """
        group = optimizer.param_groups[0]
        beta1, beta2 = group["betas"]
        denominators = []
        for p in model.parameters():
            state = optimizer.state[p]
            t = float(state["step"])  # AdamW's count after this step: k + 1
            v = state["exp_avg_sq"].double().reshape(-1)
            denominators.append(v.sqrt() / np.sqrt(1 - beta2**t) + group["eps"])
        clip = clip_factor(self._clip, float(self._norms[step - self._first]))
        batch = len(self._grads)
        scale = -group["lr"] * (1 - beta1) / (1 - beta1**t) * clip / batch
        direction = target_gradient / torch.cat(denominators)
        return (scale * (self._grads @ direction)).numpy()
