"""What per-step results along a replay share: the span's checks, its tasks, the stored rows."""

from __future__ import annotations

import re

import pytest

from observatory.arguments import ArgumentError
from observatory.attribution.spans import map_spans, open_span, result_name, spans
from observatory.errors import StoreError
from observatory.train.replay import ReplaySource


def test_spans_split_at_keyframes(tiny_store):
    source = ReplaySource.open(tiny_store, size="l2-d16", seed=0, strict=True)
    assert spans(source, 3, 9) == [(3, 4), (4, 5), (5, 8), (8, 9)]
    assert spans(source, 5, 8) == [(5, 8)]


def _task(store, size, seed, branch, part, *args):
    return (size, seed, branch, part, args)


def test_map_spans_runs_the_task_on_each_part_in_order(tiny_store):
    span = open_span(tiny_store, size="l2-d16", seed=1, start=3, stop=9)
    found = map_spans(_task, span, (1, 2), "x")
    assert found == [("l2-d16", 1, "", part, ((1, 2), "x")) for part in span.parts]


@pytest.mark.parametrize(
    ("start", "stop", "error", "message"),
    [
        (5, 5, ArgumentError, "stop: must be after start (5), got 5"),
        (-1, 5, ArgumentError, "start: must be at least 0"),
        (2, 99, StoreError, "cannot replay steps 2..99"),
        ("2", 5, ArgumentError, "start: expected an integer"),
    ],
)
def test_open_span_refuses_what_cannot_be_replayed(tiny_store, start, stop, error, message):
    with pytest.raises(error, match=re.escape(message)):
        open_span(tiny_store, size="l2-d16", seed=0, start=start, stop=stop)


@pytest.mark.parametrize("name", ["a b", "", "3x", 7])
def test_a_result_name_is_an_identifier(name):
    with pytest.raises(ArgumentError, match="name"):
        result_name(name)
