"""The report's training-dynamics section: stored dynamics drawn and tabled, else the command."""

from __future__ import annotations

import dataclasses
import html
import shlex

import numpy as np
import pandas as pd
import pytest

import observatory as obs
from observatory.cli import main
from observatory.report import write_report
from observatory.report.dynamics import (
    N_HEADS,
    Dynamics,
    dynamics_command,
    dynamics_html,
    load_dynamics,
    write_dynamics,
)
from observatory.report.figures.dynamics import dynamics as dynamics_figure
from observatory.report.results import load_results
from observatory.report.summary import summarize
from observatory.report.write import _section
from tests.report.test_attribution import PNG_MAGIC, SIZE, with_bump
from tests.report.test_summary import analysed_copy

BUMP = (4.0, 6.5)  # made up for seed 1 (the tiny runs have no loss bump)


@pytest.fixture(scope="module")
def measured(trained_tiny, tmp_path_factory):
    """An analysed copy of the tiny family: what the section says before any dynamics, then
    the store measured by the command it gives across seed 1's (made-up) bump, and its
    report."""
    _, trained = trained_tiny
    where = tmp_path_factory.mktemp("dynamics")
    store = analysed_copy(trained, where / "tiny.zarr")
    ds = load_results(store)
    before = load_dynamics(ds, summarize(ds))
    command, purpose = dynamics_command(ds, with_bump(summarize(ds), 1, BUMP))
    assert main(shlex.split(command)[1:]) == 0
    files = {path.name: path for path in write_report(store, where / "report", seeds=[1])}
    return store, before, (command, purpose), files


def test_without_dynamics_the_section_is_one_line_with_the_command(measured):
    store, before, (command, purpose), _ = measured
    assert before.results == [] and write_dynamics(before, store) == []
    assert shlex.split(before.command)[:3] == ["observatory", "dynamics", str(store)]
    assert "--start START --stop STOP" in before.command  # no seed has a bump
    assert shlex.split(command)[3:] == f"--size {SIZE} --seed 1 --start 4 --stop 7".split()
    assert purpose == "what each update of seed 1 moved across its loss bump (steps 4-7)"
    (heading, line) = dynamics_html(before, "h2")
    assert "id='dynamics'" in heading and f"<code>{html.escape(before.command)}</code>" in line
    odd = Dynamics([], "observatory dynamics 'a<b & c'", "x<y")
    shown = dynamics_html(odd, "h3")[1]
    assert f"<code>{html.escape(odd.command)}</code>" in shown and "x&lt;y" in shown
    assert "<b" not in shown


def test_the_report_draws_and_tables_the_stored_dynamics(measured):
    store, _, _, files = measured
    dyn = obs.dynamics(store, size=SIZE, seed=1)
    assert list(dyn["train_step"].values) == [4, 5, 6]
    assert files["dynamics.png"].read_bytes().startswith(PNG_MAGIC)
    table = pd.read_csv(files["dynamics.csv"])
    assert list(table["seed"]) == [1] and list(table["name"]) == ["steps_4_7"]
    summed = dyn["head_update_ratio"].sum("train_step").transpose("layer", "head")
    flat = summed.stack(pair=("layer", "head")).sortby(lambda s: -s)
    top = [f"L{layer}H{head}" for layer, head in flat["pair"].values[:N_HEADS]]
    assert table["moved_heads"][0].split() == top
    np.testing.assert_allclose(
        [float(r) for r in table["moved_head_ratios"][0].split()], flat.values[:N_HEADS], rtol=1e-5
    )
    assert table["median_update_ratio"][0] == pytest.approx(float(dyn["update_ratio"].median()))
    page = files["report.html"].read_text()
    section = page[page.index("id='dynamics'") :]
    assert section.index("<td>4-6</td>") < section.index('<figure id="dynamics"')
    assert ", ".join(top[:1]) in section.split("</table>")[0]


def test_the_figure_shows_every_head_and_the_bump(measured):
    store, _, _, _ = measured
    section = _section(
        load_results(store), include_incomplete=False, transformer_lens=False, models=True
    )
    dyn = section.dynamics.results[0]
    layers, heads = dyn.sizes["layer"], dyn.sizes["head"]
    bumped = dataclasses.replace(section, result=with_bump(section.result, 1, (5.0, 20.0)))
    for shown, bump in ((section, None), (bumped, (5.0, 7.0))):
        heads_ax, model_ax, _, cosine_ax = dynamics_figure(shown).subfigs[0].axes
        labels = [tick.get_text() for tick in heads_ax.get_yticklabels()]
        assert labels == [f"L{a}H{b}" for a in range(layers) for b in range(heads)]
        mesh = heads_ax.collections[0].get_array()
        assert mesh.shape == (layers * heads, 3)
        np.testing.assert_array_equal(mesh[heads + 1], dyn["head_update_ratio"].values[:, 1, 1])
        assert np.array_equal(model_ax.lines[0].get_ydata(), dyn["update_ratio"].values)
        np.testing.assert_array_equal(cosine_ax.lines[0].get_ydata(), dyn["update_cosine"].values)
        spans = [p for p in model_ax.patches if p.get_label() == "loss bump"]
        if bump is None:
            assert spans == []
        else:
            (span,) = spans
            assert (span.get_x(), span.get_x() + span.get_width()) == bump
    assert dynamics_figure(dataclasses.replace(section, dynamics=None)) is None
