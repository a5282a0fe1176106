"""The report's attribution section: stored attributions drawn and tabled, else the command."""

from __future__ import annotations

import dataclasses
import html
import shlex
import shutil

import numpy as np
import pandas as pd
import pytest

import observatory as obs
from observatory.cli import main
from observatory.report import write_report
from observatory.report.attribution import (
    N_WINDOWS,
    Attributions,
    _top_windows,
    attribute_command,
    attribution_html,
    attribution_table,
    load_attributions,
    windows_table,
)
from observatory.report.figures.attribution import attribution as attribution_figure
from observatory.report.results import load_results
from observatory.report.summary import summarize
from observatory.report.write import _section
from tests.report.test_summary import analysed_copy

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SIZE = "l2-d16"
BUMP = (4.0, 7.5)  # made up for seed 1 (the tiny runs have no loss bump)


def with_bump(result, seed: int, bump: tuple[float, float]):
    """The summary with a loss bump for ``seed``."""
    per_seed = result.per_seed.copy()
    per_seed.loc[seed, ["bump_start_step", "bump_end_step"]] = bump
    return dataclasses.replace(result, per_seed=per_seed)


@pytest.fixture(scope="module")
def attributed(trained_tiny, tmp_path_factory):
    """An analysed copy of the tiny family (head L1H<seed> forms): what the section says before
    any attribution, then the store attributed by the command it gives (the best head of the
    seed with a bump, across the bump) and its report."""
    _, trained = trained_tiny
    where = tmp_path_factory.mktemp("attribution")
    store = analysed_copy(trained, where / "tiny.zarr")
    ds = load_results(store)
    result = summarize(ds)
    before = load_attributions(ds, result)
    command, purpose = attribute_command(ds, with_bump(result, 1, BUMP))
    assert main(shlex.split(command)[1:]) == 0
    files = {path.name: path for path in write_report(store, where / "report", seeds=[1])}
    return store, before, (command, purpose), files


def test_without_attributions_the_section_is_one_line_with_the_command(attributed):
    store, before, _, _ = attributed
    assert before.results == [] and before.windows == []
    words = shlex.split(before.command)
    assert words[:3] == ["observatory", "attribute", str(store)]
    assert "--start START --stop STOP" in before.command  # no seed has a bump
    assert "seed 0's best induction head (L1H0)" in before.purpose
    above, below = attribution_html(before, "h2")
    assert below == [] and len(above) == 2 and "id='attribution'" in above[0]
    assert f"<code>{html.escape(before.command)}</code>" in above[1]


def test_the_command_attributes_the_best_head_across_the_bump(attributed):
    store, _, (command, purpose), _ = attributed
    assert (
        shlex.split(command)[3:]
        == (
            f"--size {SIZE} --seed 1 --start 4 --stop 8 --target induction_score "
            "--option layer=1 --option head=1 --per-example"
        ).split()
    )
    assert purpose == "the score of seed 1's best induction head (L1H1) across its loss bump " + (
        "(steps 4-8)"
    )
    att = obs.attribution(store, size=SIZE, seed=1, name="induction_score")
    assert att.attrs["target_options"] == {"layer": 1, "head": 1}
    assert list(att["train_step"].values) == [4, 5, 6, 7]


def test_the_report_draws_and_tables_the_stored_attribution(attributed):
    store, _, _, files = attributed
    att = obs.attribution(store, size=SIZE, seed=1, name="induction_score")
    assert files["attribution.png"].read_bytes().startswith(PNG_MAGIC)
    windows = pd.read_csv(files["attribution_windows.csv"])
    for sign, mark in (("positive", "+"), ("negative", "-")):
        top = obs.top_examples(att, N_WINDOWS, sign=sign)
        top = top[top["contribution"] > 0 if mark == "+" else top["contribution"] < 0]
        shown = windows[windows["sign"] == mark]
        assert len(shown) == len(top) > 0 and set(shown["seed"]) == {1}
        for column in ("train_step", "batch", "window", "contribution"):
            assert np.array_equal(shown[column].values, top[column].values), column
    steps = pd.read_csv(files["attribution_steps.csv"])
    assert np.array_equal(steps["step_contribution"], att["step_contribution"].values)
    np.testing.assert_allclose(steps["residual"].sum(), float(att["residual"]), atol=1e-12)
    summary = pd.read_csv(files["attribution.csv"])
    assert list(summary["target"]) == ["induction_score L1H1"]
    assert summary["residual"][0] == float(att["residual"])
    page = files["report.html"].read_text()
    section = page[page.index("id='attribution'") :]
    assert section.index('<figure id="attribution"') < section.index("Training windows")
    rows = section[section.index("Training windows") :].split("</table>")[0]
    assert rows.count("<tr><td>") == len(windows)
    for _, row in _top_windows(att).iterrows():
        assert (
            f"<tr><td>{row['sign']}</td><td>{row['train_step']}</td><td>{row['batch']}</td>"
            f"<td>{row['window']}</td><td>{row['contribution']:.6g}</td>"
            f"<td style='text-align: left'><code>{' '.join(map(str, row['tokens']))}</code>"
        ) in rows


def test_the_figure_shows_the_running_sum_against_the_target_and_the_bump(attributed):
    store, _, _, _ = attributed
    section = _section(
        load_results(store), include_incomplete=False, transformer_lens=False, models=True
    )
    att = section.attribution.results[0]
    bumped = dataclasses.replace(section, result=with_bump(section.result, 1, (6.0, 20.0)))
    for shown, bump in ((section, None), (bumped, (6.0, 8.0))):
        row = attribution_figure(shown).subfigs[0]
        values, terms = row.axes
        measured, summed = (line.get_ydata() for line in values.lines[:2])
        assert measured[0] == summed[0] == float(att["target_start"])
        assert np.isclose(measured[-1] - summed[-1], float(att["residual"]), rtol=1e-9)
        share = 100 * float(att["residual"]) / (measured[-1] - measured[0])
        assert f"({share:.2g}% of the change)" in row.get_suptitle()
        bars = [bar.get_height() for bar in terms.patches if bar.get_label() != "loss bump"]
        assert np.array_equal(bars, att["step_contribution"].values)
        spans = [p for p in values.patches if p.get_label() == "loss bump"]
        if bump is None:
            assert spans == []
        else:
            (span,) = spans
            assert (span.get_x(), span.get_x() + span.get_width()) == bump


def test_a_result_without_per_example_terms_has_no_windows(attributed):
    store, _, _, _ = attributed
    att = obs.attribution(store, size=SIZE, seed=1, name="induction_score")
    steps_only = att.drop_vars(["example_contribution", "example_index", "carried"])
    found = Attributions([steps_only], [None], "", "")
    assert len(windows_table(found)) == 0
    assert np.isnan(attribution_table(found)["carried"][0])
    above, below = attribution_html(found, "h2")
    assert below == [] and "<td>-</td>" in above[-1] and "induction_score L1H1" in above[-1]


def test_text_windows_are_decoded_and_escaped(trained_text, tmp_path):
    _, trained, _ = trained_text
    store = tmp_path / "text.zarr"
    shutil.copytree(trained, store)
    att = obs.attribute(
        store, size=SIZE, seed=0, start=2, stop=4, target="held_out_loss", per_example=True
    )
    table = _top_windows(att)
    top = obs.top_examples(att, N_WINDOWS)
    assert list(table["text"][table["sign"] == "+"]) == list(top["text"][top["contribution"] > 0])
    table.loc[0, "text"] = "print('<b>café & x</b>')"
    above, below = attribution_html(Attributions([att], [table], "", ""), "h3")
    page = "\n".join(above + below)
    for text in table["text"]:
        assert f"<code>{html.escape(repr(text))}</code>" in page
    assert "&lt;b&gt;café &amp; x&lt;/b&gt;" in page and "<b>" not in page
