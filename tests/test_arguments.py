"""Every bad argument of the Python API is one line (an ObservatoryError), before any work."""

import warnings

import pytest

import observatory as obs
from observatory.arguments import ArgumentError
from observatory.errors import ObservatoryError, StoreError
from tests.conftest import tree_bytes

SIZE = "l2-d16"
RUN = {"size": SIZE, "seed": 0}

# (call on the store, error type, text of the message)
CASES = {
    "step as a string": (
        lambda s: obs.model_at(s, **RUN, step="4"),
        ArgumentError,
        "step: expected an integer, got '4' (str)",
    ),
    "step as a float": (
        lambda s: obs.batch_at(s, **RUN, step=1.0),
        ArgumentError,
        "step: expected an integer, got 1.0 (float)",
    ),
    "step as a list": (
        lambda s: obs.transformer_lens_at(s, **RUN, step=[4]),
        ArgumentError,
        "step: expected an integer, got [4]",
    ),
    "negative step": (
        lambda s: obs.model_at(s, **RUN, step=-1),
        ArgumentError,
        "step: must be at least 0, got -1",
    ),
    "step past the end": (
        lambda s: obs.model_at(s, **RUN, step=10**6),
        StoreError,
        "no committed checkpoint at step 1000000 (nearest: 24;",
    ),
    "step not a checkpoint": (
        lambda s: list(obs.query.models_at(s, **RUN, steps=[3])),
        StoreError,
        "no committed checkpoint at step 3 (nearest: 2, 4; 11 committed",
    ),
    "batch past the end": (
        lambda s: obs.batch_at(s, **RUN, step=99),
        StoreError,
        "no recorded batch for step 99 (recorded steps: 0..23)",
    ),
    "seed as a float": (
        lambda s: obs.open_run(s, size=SIZE, seed=0.0),
        ArgumentError,
        "seed: expected an integer, got 0.0 (float)",
    ),
    "seed as a bool": (
        lambda s: obs.open_run(s, size=SIZE, seed=True),
        ArgumentError,
        "seed: expected an integer, got True (bool)",
    ),
    "seed as a string": (
        lambda s: list(obs.replay(s, size=SIZE, seed="0", start=0, stop=1)),
        ArgumentError,
        "seed: expected an integer",
    ),
    "unknown seed": (
        lambda s: obs.open_run(s, size=SIZE, seed=9),
        StoreError,
        "no seed 9 for size 'l2-d16' (seeds: [0, 1])",
    ),
    "seeds as an int": (
        lambda s: obs.open_family(s, size=SIZE, seeds=0),
        ArgumentError,
        "seeds: expected a list of integers, got 0 (int)",
    ),
    "seeds empty": (
        lambda s: obs.open_family(s, size=SIZE, seeds=[]),
        ArgumentError,
        "seeds: empty",
    ),
    "unknown size": (
        lambda s: obs.open_family(s, size="l9"),
        StoreError,
        "no size 'l9' (sizes: l2-d16)",
    ),
    "size as an int": (
        lambda s: obs.open_run(s, size=3, seed=0),
        ArgumentError,
        "size: expected a name (a non-empty str), got 3 (int)",
    ),
    "chunks as a list": (
        lambda s: obs.open_family(s, size=SIZE, chunks=[1]),
        ArgumentError,
        "chunks: expected None or a dict",
    ),
    "layer as a string": (
        lambda s: obs.head_weights(s, **RUN, layer="1", head=0),
        ArgumentError,
        "layer: expected an integer",
    ),
    "replay every 0": (
        lambda s: list(obs.replay(s, **RUN, start=0, stop=2, every=0)),
        ArgumentError,
        "every: must be at least 1, got 0",
    ),
    "replay start > stop": (
        lambda s: list(obs.replay(s, **RUN, start=3, stop=2)),
        StoreError,
        "cannot replay steps 3..2: steps 0..24 are recorded",
    ),
    "replay on_step not callable": (
        lambda s: list(obs.replay(s, **RUN, start=0, stop=1, on_step=3)),
        ArgumentError,
        "on_step: expected a function or None",
    ),
    "replay strict as a string": (
        lambda s: list(obs.replay(s, **RUN, start=0, stop=1, strict="no")),
        ArgumentError,
        "strict: expected True or False, got 'no' (str)",
    ),
    "path not a path": (
        lambda s: obs.open_family(5, size=SIZE),
        StoreError,
        "expected a store path or URL (str or pathlib.Path), got int",
    ),
    "path None": (lambda s: obs.open(None), StoreError, "got NoneType"),
    "path not a store": (lambda s: obs.open_run(s.parent, **RUN), StoreError, "not a zarr store"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_api_argument_is_a_one_line_observatory_error(trained_tiny, case):
    _, store = trained_tiny
    call, error, text = CASES[case]
    before = tree_bytes(store)
    with warnings.catch_warnings(), pytest.raises(ObservatoryError) as raised:
        warnings.simplefilter("error")  # no replay was started on the way
        call(store)
    assert type(raised.value) is error and text in str(raised.value)
    assert "\n" not in str(raised.value)
    assert tree_bytes(store) == before
