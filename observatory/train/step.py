"""The one training step, and the state around it, shared by training and replay.

:func:`train_step` is the optimizer step of :func:`~observatory.train.train_run` and of
:mod:`~observatory.train.replay`: being one function is what makes a replayed step the step
training took.  :func:`snapshot` and :func:`restore` move the training state (weights, AdamW
moments, RNG state) to and from a :class:`~observatory.store.Checkpoint`, and :func:`recipe`
fixes the numerics a run is trained and replayed under.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from importlib.metadata import version

import numpy as np
import torch

from observatory.models import stack_layers, unstack_layers
from observatory.spec import RunSpec
from observatory.store import Checkpoint
from observatory.train.interventions import Hooks


def train_step(
    model,
    optimizer,
    tokens: torch.Tensor,
    *,
    lr: float,
    grad_clip: float,
    before_update: Callable[[torch.Tensor], None] | None = None,
    hooks: Hooks | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch: the step of training, and of replay (one function).

    Parameters
    ----------
    model, optimizer
        The model (train mode) and its AdamW optimizer.
    tokens
        ``[batch, context]`` token ids; the model learns to predict each next token.
    lr
        Learning rate of this step (``spec.optimizer.lr_at(step, total_steps)``).
    grad_clip
        Clip the gradient norm to this (0: no clipping).
    before_update
        Called with the loss after the backward pass, while the parameters hold this batch's
        unclipped gradients and the weights that produced them (replay's ``on_step``).
    hooks
        A branch's intervention (:class:`~observatory.train.interventions.Hooks`): heads
        ablated in the forward pass, frozen heads' gradients zeroed before ``before_update``
        and their weights restored after the update.

    Returns
    -------
    tuple of torch.Tensor
        The loss and the gradient norm before clipping (0-dim tensors).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    with nullcontext() if hooks is None else hooks.forward():
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    if hooks is not None:
        hooks.mask_gradients()
    if before_update is not None:
        before_update(loss)
    # clip_grad_norm_ returns the norm before clipping; max_norm=inf only measures it
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    with nullcontext() if hooks is None else hooks.update():
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # Detached: a loss kept by the caller would otherwise keep the step's autograd graph alive
    # into the next step, raising peak memory.
    return loss.detach(), grad_norm


def clip_factor(grad_clip: float, grad_norm: float) -> float:
    """The factor :func:`train_step` scaled a gradient of norm ``grad_norm`` by (1: unclipped).

    ``clip_grad_norm_``'s own rule, so that with the recorded (float32) gradient norm it is the
    factor training applied.
    """
    return min(1.0, grad_clip / (grad_norm + 1e-6)) if grad_clip else 1.0


def snapshot(
    model, optimizer, step: int, tokens_per_step: int, state: bool, rng: torch.Tensor | None = None
) -> Checkpoint:
    """Copy the weights (and, if ``state``, AdamW moments and RNG state) for the writer.

    ``rng`` is the RNG state training continues with (default: torch's global one).
    """
    params = dict(model.named_parameters())
    checkpoint = Checkpoint(
        step=step, tokens_seen=step * tokens_per_step, params=stack_layers(params)
    )
    if not state:
        return checkpoint
    moments = {}
    for moment in ("exp_avg", "exp_avg_sq"):
        # Before the first update AdamW has no state yet: the moments are zero.
        moments[moment] = stack_layers(
            {
                name: optimizer.state[p][moment] if p in optimizer.state else torch.zeros_like(p)
                for name, p in params.items()
            }
        )
    rng_state = (torch.get_rng_state() if rng is None else rng).numpy().copy()
    return dataclasses.replace(checkpoint, moments=moments, rng_state=rng_state)


def restore(model, optimizer, checkpoint: Checkpoint) -> None:
    """Load a checkpoint's weights, AdamW state and RNG state into ``model`` and ``optimizer``."""
    params = unstack_layers(checkpoint.params)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    if checkpoint.step > 0:
        moments = {m: unstack_layers(arrays) for m, arrays in checkpoint.moments.items()}
        for name, p in model.named_parameters():
            optimizer.state[p] = {
                # AdamW keeps its step count as a float32 tensor
                "step": torch.tensor(float(checkpoint.step), dtype=torch.float32),
                "exp_avg": moments["exp_avg"][name].to(p.device, copy=True),
                "exp_avg_sq": moments["exp_avg_sq"][name].to(p.device, copy=True),
            }
    torch.set_rng_state(torch.from_numpy(np.array(checkpoint.rng_state, dtype=np.uint8)))


@contextmanager
def recipe(threads: int) -> Iterator[None]:
    """Run the block under the numerics the recipe fixes: deterministic kernels, ``threads``.

    Determinism: one seed fixes the initial weights; the data order has its own seed and is a
    pure function of the step, so no loader state can drift. The thread count is fixed by the
    spec because CPU reductions round differently with a different split of the work.
    """
    torch.use_deterministic_algorithms(True)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def recipe_record(spec: RunSpec) -> dict[str, str | int]:
    """What, besides the spec and the seeds, decides a run's numbers bit for bit.

    Stored with every run: replay refuses (or, if asked, warns) where the machine it runs on
    differs, since the same floats are only promised for the same kernels and work split.
    """
    return {
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "threads": spec.train.threads,
        "device": spec.train.device,
        # the SIMD kernels torch dispatches to (e.g. AVX2 vs AVX512) round differently
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def setup_device(device: str) -> dict[str, str]:
    """Make training on ``device`` deterministic; what to record about it with the run.

    Weights are bit-identical from run to run on one device type (CPU with the spec's thread
    count; CUDA with deterministic kernels), not from one device type to another.
    """
    if device == "cpu":
        return {"type": "cpu", "name": platform.processor() or platform.machine()}
    # cuBLAS needs a fixed workspace to reduce deterministically; TF32 would round differently.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    return {
        "type": "cuda",
        "name": torch.cuda.get_device_name(),
        "cuda": str(torch.version.cuda),
        "cudnn": str(torch.backends.cudnn.version()),
    }
