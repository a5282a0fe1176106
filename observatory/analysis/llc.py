"""The local learning coefficient (LLC) of a checkpoint, estimated by SGLD with ``devinterp``.

Singular learning theory's LLC measures the effective number of parameters a model uses at a
point of weight space. Lau et al. 2023 estimate it from SGLD chains started at the checkpoint
``w*`` and localised around it: ``LLC = n_beta * (E_SGLD[L] - L(w*))``; Hoogland et al. 2024
read developmental stages of a 2-layer attention-only model off its plateaus (induction heads
form within one stage). ``devinterp`` (>= 2) runs the chains; this module only fixes its inputs
and seeds, so the estimate is a deterministic function of the checkpoint, the data and the
options.
"""

import contextlib
import dataclasses
import random
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any
from unittest import mock

import numpy as np
import torch
from transformers import PreTrainedModel

from observatory.errors import SpecError

INSTALL_HINT = 'pip install -e ".[llc]"  (devinterp >= 2)'
# devinterp's name of each SGLD setting whose name differs
SAMPLER_NAMES = {
    "chains": "num_chains",
    "draws": "num_draws",
    "burnin": "num_burnin_steps",
    "seed": "init_seed",
}


def require_devinterp(where: str) -> None:
    """Raise a one-line :class:`SpecError` naming the install command if devinterp is missing."""
    try:
        import devinterp.slt.sampling  # noqa: F401
    except ImportError:
        raise SpecError(f"{where}: needs devinterp; install it with: {INSTALL_HINT}") from None


@dataclass(frozen=True)
class SGLD:
    """The SGLD sampler's settings: the ``llc`` analysis's options, in one place.

    Attributes
    ----------
    lr
        SGLD step size (epsilon).
    n_beta
        Inverse temperature times the number of samples (n * beta).
    localization
        Strength gamma of the pull towards the checkpoint's weights.
    chains
        Number of SGLD chains (their seeds are ``seed, seed + 1, ...``).
    draws
        Loss draws per chain after burn-in.
    burnin
        SGLD steps per chain before the draws (their losses count in devinterp's estimate too).
    batch_size
        Sequences per SGLD step.
    seed
        Seed of the chains and the minibatch order: the same seed gives the same estimate.
    """

    lr: float = 3e-5
    n_beta: float = 30.0
    localization: float = 3000.0
    chains: int = 2
    draws: int = 100
    burnin: int = 0
    batch_size: int = 16
    seed: int = 0

    def validate(self, where: str) -> None:
        """Raise a one-line :class:`SpecError` on an impossible setting or without devinterp."""
        for name in ("lr", "n_beta", "localization"):
            if not getattr(self, name) > 0:
                raise SpecError(f"{where}.{name}: must be > 0")
        for name in ("chains", "draws", "batch_size"):
            if getattr(self, name) < 1:
                raise SpecError(f"{where}.{name}: must be >= 1")
        if self.burnin < 0:
            raise SpecError(f"{where}.burnin: must be >= 0")
        require_devinterp(where)


def local_learning_coefficient(
    model: PreTrainedModel, tokens: np.ndarray, settings: SGLD = SGLD()
) -> dict[str, Any]:
    """Estimate the LLC of ``model`` on ``tokens`` with SGLD chains (``devinterp.slt``).

    Parameters
    ----------
    model
        The checkpoint's model; it is copied by the sampler, never changed.
    tokens
        ``tokens[sequence, position]``: the data of the loss (each SGLD step a minibatch of
        ``settings.batch_size`` sequences, drawn in an order fixed by ``settings.seed``).
    settings
        The sampler's settings.

    Returns
    -------
    dict
        ``llc`` (mean over chains), ``llc_std`` (standard deviation over chains) and
        ``llc_init_loss`` (the loss at the checkpoint), as floats; ``llc_loss_trace``
        (``[burnin + draws]``, the SGLD loss at every step, mean over chains): flat after
        burn-in when the chains have converged.
    """
    from datasets import Dataset
    from devinterp.slt.llc import compute_llc
    from devinterp.slt.sampling import sample

    rows = np.asarray(tokens, dtype=np.int64)
    data = Dataset.from_dict({"input_ids": rows.tolist()}).with_format("torch")
    with tempfile.TemporaryDirectory() as directory, _quiet_and_isolated():
        samples = sample(
            model=model,
            dataset=data,
            observables={},
            **{SAMPLER_NAMES.get(k, k): v for k, v in dataclasses.asdict(settings).items()},
            num_init_loss_batches=max(1, len(rows) // settings.batch_size),
            device="cpu",
            output_path=f"{directory}/samples.zarr",
        )
        result = compute_llc(samples).load()
    return {
        "llc": float(result["llc_mean"]),
        "llc_std": float(result["llc_std"]),
        "llc_init_loss": float(result["init_loss"]),
        "llc_loss_trace": result["loss_trace"].mean(dim="chain").values.astype(np.float32),
    }


@contextlib.contextmanager
def _quiet_and_isolated() -> Iterator[None]:
    """No progress bar per chain; the global RNGs the sampler seeds are restored afterwards."""
    from tqdm.auto import trange

    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        with (
            torch.random.fork_rng(devices=[]),
            mock.patch("devinterp.slt.sampler.trange", partial(trange, disable=True)),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")  # e.g. "sampling without output_path"
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
