"""Checks of a run against its ledger: the hashes recorded when each checkpoint was written.

``observatory verify`` reads every checkpoint back and compares it with the SHA-256 recorded by
the writer (:func:`~observatory.store.integrity.weights_digest` of its weights and, at a
keyframe, :func:`~observatory.store.integrity.state_digest` of its optimizer and RNG state).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from observatory.errors import StoreError
from observatory.store.integrity import checked_read, state_digest, weights_digest
from observatory.store.layout import KEYFRAME, MOMENTS, SHA256, STATE_GROUP, WEIGHTS_SHA256
from observatory.store.results import analyses, analysis_arrays

if TYPE_CHECKING:
    from observatory.store.reader import RunReader


def verify_checkpoint(reader: RunReader, step: int) -> np.ndarray:
    """Check a checkpoint of a run against the ledger.

    Returns
    -------
    numpy.ndarray
        The SHA-256 of the weights read (32 ``uint8``), which matches the recorded one.

    Raises
    ------
    StoreError
        If the weights (or, at a keyframe, the optimizer and RNG state) read now differ
        from what was written, or cannot be read.
    """
    return verify_checkpoints(reader, [step])[0]


def verify_checkpoints(reader: RunReader, steps: Sequence[int]) -> list[np.ndarray]:
    """:func:`verify_checkpoint` for nearby checkpoints, each array read once over their
    range (a chunk holds up to ``checkpoints_per_chunk`` of them: it is decoded once, not once
    per checkpoint)."""
    steps = [int(step) for step in steps]
    stored = set(reader.keyframe_steps().tolist())
    keyframes = [step for step in steps if step in stored]
    position = {step: k for k, step in enumerate(keyframes)}
    try:
        params = reader.parameters_for(steps)
        indices = [reader.checkpoint_index(s) for s in steps]
        weights = reader.read_indices(WEIGHTS_SHA256, indices)
        states = _states_for(reader, keyframes) if keyframes else None
    except StoreError as err:  # a damaged chunk: say which checkpoints it belongs to
        raise StoreError(f"step {steps[0]}: {err}") from None
    digests = []
    for i, step in enumerate(steps):
        digest = weights_digest({name: values[i] for name, values in params.items()})
        recorded = {"weights": (digest, weights[i])}
        if step in position:
            k = position[step]
            moments, rng_state, hashes = states
            now = state_digest(
                {m: {n: a[k] for n, a in arrays.items()} for m, arrays in moments.items()},
                rng_state[k],
            )
            recorded["optimizer and RNG state"] = (now, hashes[k])
        for what, (now, then) in recorded.items():
            if not np.array_equal(now, then):
                raise StoreError(
                    f"{reader.run.path}: the {what} of step {step} differ from the hash "
                    "recorded when they were written"
                )
        digests.append(digest)
    return digests


def _states_for(reader: RunReader, keyframes: list[int]) -> tuple[dict, np.ndarray, np.ndarray]:
    """AdamW moments (moment -> name -> ``[k, ...]``), RNG states and their recorded hashes
    at several keyframes, each array read once over their range."""
    reader.refuse_if_ingested("no training state to read")
    rows = [reader.keyframe_index(step) for step in keyframes]
    read = reader.read_indices
    moments = {
        m: {n: read(f"{STATE_GROUP}/{m}/{n}", rows) for n in reader.parameter_names}
        for m in MOMENTS
    }
    rng_state = read(f"{STATE_GROUP}/rng_state", rows)
    return moments, rng_state, read(f"{STATE_GROUP}/{SHA256}", rows)


def recorded_digests(reader: RunReader, step: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The ledger's entries for a checkpoint, as recorded when it was written.

    Returns
    -------
    tuple
        The SHA-256 of the weights (32 ``uint8``, see
        :func:`~observatory.store.integrity.weights_digest`) and, at a keyframe, of the
        optimizer and RNG state (:func:`~observatory.store.integrity.state_digest`), else None.
    """
    index = reader.checkpoint_index(step)
    weights = reader.read(reader.array(WEIGHTS_SHA256), index)
    if step not in reader.keyframe_steps():
        return weights, None
    keyframe = reader.keyframe_index(step)
    return weights, reader.read(reader.array(f"{STATE_GROUP}/{SHA256}"), keyframe)


def step_coordinates(reader: RunReader) -> dict[str, np.ndarray]:
    """The stored ``step``, ``tokens_seen`` and ``keyframe`` arrays (their committed part).

    Readers take the steps from the schedule and the commit markers; these arrays are for
    readers that do not know the markers, and for checking that both agree.
    """
    n_checkpoints, n_keyframes = reader.n_checkpoints, len(reader.keyframe_steps())
    return {
        "step": reader.read(reader.array("step"), slice(0, n_checkpoints)),
        "tokens_seen": reader.read(reader.array("tokens_seen"), slice(0, n_checkpoints)),
        KEYFRAME: reader.read(reader.array(f"{STATE_GROUP}/{KEYFRAME}"), slice(0, n_keyframes)),
    }


def read_all_analyses(reader: RunReader) -> None:
    """Read every stored analysis result once: a damaged chunk raises :class:`StoreError`."""
    for name in analyses(reader):
        steps, arrays = analysis_arrays(reader, name)
        for array in arrays.values():
            per_step = (array.metadata.dimension_names or ())[:1] == ("step",)
            checked_read(array, slice(0, len(steps)) if per_step else Ellipsis)
