"""Writing a report: the figures of every size, its summary tables, the HTML pages."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
import xarray as xr

from observatory.errors import StoreError
from observatory.jobs.job_spec import HeldOutSpec
from observatory.report import interactive, tables
from observatory.report.attribution import load_attributions, write_attribution
from observatory.report.dynamics import load_dynamics, write_dynamics
from observatory.report.figures import FIGURES
from observatory.report.page import Drawn, html_page
from observatory.report.registry import ReportFigure, Section, collect, user_figures
from observatory.report.results import load_branches, load_results
from observatory.report.summary import (
    Summary,
    check_results,
    seed_alignment,
    summarize,
    token_loss_pca,
)
from observatory.report.text import TextExamples, compared_steps, text_examples
from observatory.report.transitions import (
    SIGNAL,
    held_out_windows,
    transition_table,
    write_transitions,
)

DPI = 120
# Analyses the report draws on (all of them: figures for each). The training loss is drawn
# where recorded (ingested checkpoints may come without it).
REQUIRED = ("induction_score", "previous_token_score", "icl_score", "token_loss")
NOT_DRAWN = ("not analysed", "not trained")  # seeds without results: in the tables only
TL_SCORES = "tl_induction_score"  # what --transformer-lens draws


def write_report(
    path: str | Path | xr.Dataset,
    out_dir: str | Path,
    *,
    sizes: list[str] | None = None,
    seeds: list[int] | None = None,
    include_incomplete: bool = False,
    transformer_lens: bool = False,
    figures: Sequence[str | Path | ReportFigure] = (),
) -> list[Path]:
    """Write the figures, the summary tables, one self-contained HTML page and its interactive twin.

    Parameters
    ----------
    path
        The family store (analysed with ``observatory analyze``), or a dataset from
        :func:`~observatory.report.results.load_results`.
    out_dir
        Directory to write into (created if needed; existing report files are replaced).
    sizes
        Sizes to report (default: every size of the store). With several, the page has a
        section per size and a comparison of the sizes, and each size's PNGs and tables go
        into ``<out_dir>/<size>/``.
    seeds
        Seed indices to report (default: every seed).
    include_incomplete
        Keep incomplete runs in the cross-seed statistics (see
        :func:`~observatory.report.summary.summarize`); they are drawn and marked either way.
        Seeds without results (not trained or not analysed) are listed, not drawn.
    transformer_lens
        Also draw the induction scores in the TransformerLens convention (``tl_*``, which the
        ``head_scores`` analysis writes unless ``transformer_lens_too = false``).
    figures
        More figures, after the built-in ones: ``.py`` files (every
        :func:`~observatory.report.registry.figure` they define) or figures themselves.

    Returns
    -------
    list of pathlib.Path
        Every file written: the HTML page (``report.html``, images embedded as base64) first,
        then ``report_interactive.html`` (plotly, plotly.js embedded: works offline), then per
        size the PNG figures (see :data:`~observatory.report.figures.FIGURES`; those without
        data are skipped), ``summary.csv`` (per seed), ``summary_across_seeds.csv``,
        ``summary.json``, ``branches.csv`` (where the runs have branches),
        ``transitions.csv`` and ``transitions.json`` (where at least 2 seeds have
        ``per_token_loss`` results: see :func:`~observatory.report.transitions.transitions`),
        ``attribution.csv`` and ``attribution_windows.csv`` (where the runs hold
        attributions: see :mod:`~observatory.report.attribution`), ``dynamics.csv`` (where
        they hold training dynamics: see :mod:`~observatory.report.dynamics`) and, with
        several sizes, ``sizes.csv``.

    Raises
    ------
    StoreError
        If the store, a size or a seed does not exist, no seed of a size has results, or
        ``transformer_lens`` is asked for and a size has no TransformerLens-convention scores.
    SpecError
        If a figure module does not exist, fails, defines no figure or a figure's file name
        is taken.
    """
    drawing = collect([*FIGURES.values(), *user_figures(figures)])
    sections = [
        _section(
            ds,
            include_incomplete=include_incomplete,
            transformer_lens=transformer_lens,
            models=not isinstance(path, xr.Dataset),
            branches=branches,
        )
        for ds, branches in _datasets(path, sizes, seeds)
    ]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    several = len(sections) > 1
    written: list[Path] = []
    rendered: list[tuple[Section, list[Drawn]]] = []
    for section in sections:
        where = out / section.result.size if several else out
        where.mkdir(exist_ok=True)
        drawn = _write_figures(section, where, drawing.values())
        written += [target for target, _ in drawn] + _write_tables(section, where)
        rendered.append((section, drawn))
    if several:
        written.append(out / "sizes.csv")
        comparison = tables.size_comparison([section.result for section in sections])
        comparison.to_csv(written[-1], index=False)
    page, interactive_page = out / "report.html", out / "report_interactive.html"
    page.write_text(html_page(rendered), encoding="utf-8")
    interactive_page.write_text(
        interactive.page(
            [
                (section.result, section.ds, section.text, section.transitions)
                for section in sections
            ],
            transformer_lens=transformer_lens,
        ),
        encoding="utf-8",
    )
    return [page, interactive_page, *written]


def _datasets(
    path: str | Path | xr.Dataset, sizes: list[str] | None, seeds: list[int] | None
) -> list[tuple[xr.Dataset, xr.Dataset | None]]:
    """Each size's results and its branches' (None: a dataset given, or no branches)."""
    if isinstance(path, xr.Dataset):
        return [(path if seeds is None else path.sel(seed=seeds), None)]
    from observatory.store import FamilyStore

    return [
        (load_results(path, size=size, seeds=seeds), load_branches(path, size=size, seeds=seeds))
        for size in sizes or FamilyStore(path).sizes()
    ]


def _section(
    ds: xr.Dataset,
    *,
    include_incomplete: bool,
    transformer_lens: bool,
    models: bool = False,
    branches: xr.Dataset | None = None,
) -> Section:
    """What the figures of one size draw on (``models``: the store's models can be read)."""
    check_results(ds, REQUIRED)
    if transformer_lens and (TL_SCORES not in ds or not bool(ds[TL_SCORES].notnull().any())):
        where = f"{ds.attrs.get('store', 'dataset')} (size {ds.attrs.get('size', '?')})"
        raise StoreError(
            f"{where}: no TransformerLens-convention scores ({TL_SCORES}) to draw; run the "
            "head_scores analysis with transformer_lens_too = true (the default)"
        )
    result = summarize(ds, include_incomplete=include_incomplete, branches=branches)
    drawn = result.per_seed.index[~result.per_seed["left_out"].isin(NOT_DRAWN)]
    ds = ds.sel(seed=list(drawn))
    used = [int(seed) for seed in result.per_seed.index[result.per_seed["left_out"] == ""]]
    return Section(
        ds=ds,
        result=result,
        pca=token_loss_pca(ds),
        alignment=seed_alignment(ds, used) if len(used) > 1 else None,
        transformer_lens=transformer_lens,
        text=_text(ds, result, used) if models else None,
        branches=branches,
        transitions=_transitions(ds, windows=models),
        attribution=load_attributions(ds, result) if models else None,
        dynamics=load_dynamics(ds, result) if models else None,
    )


def _transitions(ds: xr.Dataset, *, windows: bool) -> pd.DataFrame | None:
    """The transitions of the seeds drawn; None without ``per_token_loss`` results for 2 seeds.

    ``windows``: the results come from a store, whose held-out text the examples show.
    """
    if SIGNAL not in ds:
        return None
    analysed = ds[SIGNAL].notnull().any([dim for dim in ds[SIGNAL].dims if dim != "seed"])
    if int(analysed.sum()) < 2:
        return None
    shown = held_out_windows(ds) if windows else None
    try:
        return transition_table(ds, windows=shown, ablation=windows)
    except StoreError:  # too few checkpoints analysed, or fewer than 2 seeds at every token
        return None


def _text(ds: xr.Dataset, result: Summary, used: list[int]) -> TextExamples | None:
    """A text family's examples, on the first seed used (or drawn), across its loss bump."""
    store = ds.attrs["store"]
    if not ds.sizes["seed"]:
        return None
    seed = used[0] if used else int(ds["seed"].values[0])
    losses = ds["icl_score"].sel(seed=seed)
    steps = losses["step"].values[losses.notnull().values]
    if not len(steps):
        return None
    before, after = compared_steps(steps, result.per_seed.loc[seed].to_dict())
    recorded, default = ds["token_loss"].attrs, HeldOutSpec()
    held_out = HeldOutSpec(
        seed=int(recorded.get("loss_positions_seed", default.seed)),
        n_sequences=int(recorded.get("held_out_n_sequences", default.n_sequences)),
    )
    row = result.per_seed.loc[seed]
    best = (int(row["best_layer"]), int(row["best_head_in_layer"]))
    return text_examples(
        store,
        size=str(ds.attrs["size"]),
        seed=seed,
        before=before,
        after=after,
        held_out=held_out,
        head=best if min(best) >= 0 else (0, 0),
    )


def _write_figures(section: Section, out: Path, drawing: Iterable[ReportFigure]) -> list[Drawn]:
    drawn = []
    for found in drawing:
        image = found(section)
        if image is None:  # nothing to draw (e.g. no copying scores)
            continue
        target = out / found.name
        image.savefig(target, dpi=DPI)
        drawn.append((target, found))
    return drawn


def _write_tables(section: Section, out: Path) -> list[Path]:
    result = section.result
    written = [out / "summary.csv", out / "summary_across_seeds.csv", out / "summary.json"]
    result.per_seed.to_csv(written[0])
    result.across_seeds.to_csv(written[1], index_label="quantity")
    written[2].write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
    if len(result.branches):
        written.append(out / "branches.csv")
        result.branches.to_csv(written[-1])
    if section.transitions is not None:
        written += write_transitions(section.transitions, out)
    if section.attribution is not None:
        written += write_attribution(section.attribution, out)
    if section.dynamics is not None:
        written += write_dynamics(section.dynamics, out)
    return written
