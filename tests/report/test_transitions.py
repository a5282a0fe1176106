"""Transitions in the report: the table on a section, its figures, its tables, its timeline."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from observatory.report import write_report
from observatory.report.figures import transitions as figures
from observatory.report.transitions import COLUMNS, transition_table
from observatory.report.write import _section, _transitions
from tests.report.test_summary import CHECKPOINTS, synthetic_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_HELD_OUT, N_POSITIONS = 16, 63  # synthetic_results' held-out sequences and loss positions
# step at which each planted group's loss is halfway down (seed i: times 1 + 0.1 i)
PLANTED = {40.0: slice(0, 150), 300.0: slice(150, 300)}


def with_token_losses(seeds=(0, 1, 2)):
    """``synthetic_results`` with ``per_token_loss``: two groups of tokens (random positions)
    drop by 2 nats along a sigmoid in log step, at the steps of :data:`PLANTED`; every other
    token stays at 4 nats; independent noise on each token and checkpoint."""
    ds = synthetic_results(seeds)
    rng = np.random.default_rng(1)
    n_tokens = N_HELD_OUT * N_POSITIONS
    order = rng.permutation(n_tokens)
    x = np.log1p(CHECKPOINTS)
    values = []
    for i, _ in enumerate(seeds):
        loss = 4.0 + rng.normal(0, 0.05, (len(CHECKPOINTS), n_tokens))
        for centre, group in PLANTED.items():
            drop = 2.0 / (1 + np.exp(-(x - np.log1p(centre * (1 + 0.1 * i))) / 0.25))
            loss[:, order[group]] -= drop[:, None]
        values.append(loss.reshape(len(CHECKPOINTS), N_HELD_OUT, N_POSITIONS))
    ds["per_token_loss"] = (("seed", "step", "held_out", "loss_position"), np.array(values))
    return ds, [np.sort(order[group]) for group in PLANTED.values()]


def windows():
    """Held-out windows whose decoded text needs escaping in HTML."""
    tokens = np.arange(N_HELD_OUT * (N_POSITIONS + 1)).reshape(N_HELD_OUT, -1) % 50
    return tokens, lambda ids: "<" + " ".join(str(int(token)) for token in ids) + "&>"


@pytest.fixture(scope="module")
def planted():
    return with_token_losses()


@pytest.fixture(scope="module")
def section(planted):
    ds, _ = planted
    found = _section(ds, include_incomplete=False, transformer_lens=False)
    return dataclasses.replace(found, transitions=transition_table(ds, windows=windows()))


@pytest.fixture(scope="module")
def report(planted, tmp_path_factory):
    ds, _ = planted
    out = tmp_path_factory.mktemp("transitions")
    return out, write_report(ds, out)


def test_both_planted_groups_are_found_in_every_seed_and_universal(planted, section):
    _, groups = planted
    table = section.transitions
    assert sorted(set(table["transition"])) == [0, 1]
    for tid, (centre, tokens) in enumerate(zip(PLANTED, groups, strict=True)):
        rows = table[table["transition"] == tid]
        assert sorted(rows["seed"]) == [0, 1, 2] and rows["universal"].all()
        for row in rows.itertuples(index=False):
            assert row.start_step < centre * (1 + 0.1 * row.seed) < row.end_step
            assert np.array_equal(np.sort(row.tokens), tokens)
    late = table[table["transition"] == 1]
    assert "induction" in late["components"].iloc[0]  # the planted induction heads rise then
    assert table["examples"].str.contains("&>").all()


def test_the_section_has_transitions_only_with_per_token_losses_of_two_seeds(planted):
    ds, _ = planted
    section = _section(ds, include_incomplete=False, transformer_lens=False)
    assert section.transitions is not None and len(section.transitions) == 6
    assert section.transitions["examples"].eq("").all()  # a dataset given: no held-out text
    assert _transitions(synthetic_results(), windows=False) is None  # no per_token_loss
    assert _transitions(ds.sel(seed=[0]), windows=False) is None  # one seed
    assert _transitions(ds.isel(step=slice(0, 5)), windows=False) is None  # 5 checkpoints


def test_figures_draw_every_transition_and_the_universal_ones(section, tmp_path):
    atlas = figures.transition_atlas(section)
    labels = {text.get_text() for text in atlas.axes[0].texts}
    assert {f"T{tid}: 150" for tid in (0, 1)} <= labels
    legend = [text.get_text() for text in atlas.axes[0].get_legend().get_texts()]
    assert legend == ["T0: every seed (3 of 3)", "T1: every seed (3 of 3)"]
    universal = figures.universal_transitions(section)
    (loss_0, loss_1), (heads_0, heads_1) = np.reshape(universal.axes, (2, 2))
    assert all(len(ax.get_lines()) == 3 for ax in (loss_0, loss_1))  # a line per seed
    assert "e.g. '<" in loss_0.get_title()
    assert "no head score changed" in heads_0.texts[0].get_text()  # no head is planted at T0
    assert len(heads_1.get_lines()) == 9  # the three heads that change most, per seed
    for name, drawn in (("atlas.png", atlas), ("universal.png", universal)):
        drawn.savefig(tmp_path / name, dpi=60)
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)


def test_no_transitions_is_a_note_and_no_universal_figure(section):
    empty = pd.DataFrame(columns=[*COLUMNS, "tokens"])
    empty.attrs = {"seeds": [0, 1, 2], "method": "m"}
    found = dataclasses.replace(section, transitions=empty)
    note = figures.transition_atlas(found)
    assert (
        note is not None and "no transitions found in 3 seeds" in note.axes[0].texts[0].get_text()
    )
    assert figures.universal_transitions(found) is None
    none = dataclasses.replace(section, transitions=None)
    assert figures.transition_atlas(none) is None and figures.universal_transitions(none) is None
    specific = section.transitions.assign(universal=False)
    specific.attrs = section.transitions.attrs
    assert figures.universal_transitions(dataclasses.replace(section, transitions=specific)) is None


def test_report_writes_the_transition_files_figures_and_table(report):
    out, files = report
    names = {path.name for path in files}
    assert {"transitions.csv", "transitions.json", "transitions.png"} <= names
    assert "universal_transitions.png" in names
    assert (out / "transitions.png").read_bytes().startswith(PNG_MAGIC)
    rows = pd.read_csv(out / "transitions.csv")
    assert len(rows) == 6 and "tokens" not in rows
    page = (out / "report.html").read_text()
    assert "<h2>Transitions</h2>" in page and page.count("<table") == 4
    assert "<td>T1</td>" in page and "0 1 2 (3 of 3)" in page
    assert '<figure id="transitions"><h2>Transitions (atlas)</h2>' in page


def test_interactive_page_has_the_transition_timeline_with_hover_text(report, section):
    out, _ = report
    text = (out / "report_interactive.html").read_text()
    assert text.count("Plotly.newPlot") == 6  # the five figures and the timeline
    assert "transition T1, seed 2: universal (every seed)" in text
    assert "window: steps" in text and "loss drop" in text
    from observatory.report.interactive import transition_timeline

    hover = transition_timeline(section.transitions).data[0].text[0]
    assert "e.g. &#x27;&lt;" in hover and "&amp;&gt;" in hover  # escaped: plotly renders HTML


def test_a_report_without_per_token_losses_writes_no_transition_files(tmp_path):
    names = {path.name for path in write_report(synthetic_results(), tmp_path)}
    assert not {"transitions.csv", "transitions.json", "transitions.png"} & names
    assert "universal_transitions.png" not in names
    assert "<h2>Transitions</h2>" not in (tmp_path / "report.html").read_text()
