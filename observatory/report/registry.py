"""Report figures declare themselves: ``@figure(name, title=...)`` on one function.

A figure is a function ``draw(section) -> matplotlib Figure | None`` (None: nothing to draw
for these results, e.g. no copying scores) whose docstring is its caption; the decorator turns
it into a :class:`ReportFigure` that carries its file name, title and caption beside the
drawing code. The built-in figures
are those of the modules of :mod:`observatory.report.figures`; a user's figures come from a
``.py`` file or a :class:`ReportFigure` given to
:func:`~observatory.report.write.write_report` (``figures=[...]``).
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import xarray as xr
from matplotlib.figure import Figure

from observatory.errors import SpecError
from observatory.report.attribution import Attributions
from observatory.report.dynamics import Dynamics
from observatory.report.summary import SeedAlignment, Summary
from observatory.report.text import TextExamples


@dataclass(frozen=True, eq=False)
class Section:
    """What the figures of one size draw on.

    Attributes
    ----------
    ds
        Results of the seeds drawn (those with results), as from
        :func:`~observatory.report.results.load_results`.
    result
        The summary of every seed asked for.
    pca
        :func:`~observatory.report.summary.token_loss_pca` of the seeds drawn.
    alignment
        Heads matched across seeds and their CKA (None with fewer than two seeds used).
    transformer_lens
        Also draw the TransformerLens-convention scores.
    text
        A text family's held-out text and the tokens that gain most across the loss bump
        (None for token ids).
    branches
        The branches of the seeds, as from
        :func:`~observatory.report.results.load_branches` (None: no branches).
    transitions
        The transitions of the seeds drawn, one row per (transition, seed), as from
        :func:`~observatory.report.transitions.transition_table` (None: no ``per_token_loss``
        results for at least 2 seeds at enough checkpoints).
    attribution
        The attributions stored in the runs drawn, as from
        :func:`~observatory.report.attribution.load_attributions` (None: results given as a
        dataset, not a store).
    dynamics
        The training dynamics stored in the runs drawn, as from
        :func:`~observatory.report.dynamics.load_dynamics` (None: results given as a dataset).
    """

    ds: xr.Dataset
    result: Summary
    pca: xr.Dataset
    alignment: SeedAlignment | None
    transformer_lens: bool
    text: TextExamples | None = None
    branches: xr.Dataset | None = None
    transitions: pd.DataFrame | None = None
    attribution: Attributions | None = None
    dynamics: Dynamics | None = None


@dataclass(frozen=True, eq=False)
class ReportFigure:
    """A registered report figure; calling it draws it.

    Attributes
    ----------
    name
        The PNG's file name, e.g. ``"loss_curves.png"``.
    title
        The figure's heading on the page.
    caption
        What the figure shows, printed under it.
    draw
        ``draw(section) -> Figure | None``.
    """

    name: str
    title: str
    caption: str
    draw: Callable[[Section], Figure | None]

    def __call__(self, section: Section) -> Figure | None:
        return self.draw(section)


def figure(
    name: str, *, title: str, caption: str | None = None
) -> Callable[[Callable], ReportFigure]:
    """Declare a report figure: its file name, title and caption beside its drawing code.

    Parameters
    ----------
    name
        The PNG's file name (``*.png``).
    title
        The heading on the page.
    caption
        The text under the figure (default: the function's docstring, as one paragraph).

    Returns
    -------
    callable
        A decorator turning ``draw(section) -> Figure | None`` into a :class:`ReportFigure`.

    Examples
    --------
    >>> @figure("head_norm.png", title="Head norms")
    ... def head_norm(section):
    ...     'Norm of every head output over training, one line per head.'
    ...     ...  # draw section.ds["head_norm"] on a matplotlib Figure and return it
    """
    if not name.endswith(".png"):
        raise SpecError(f"figure {name!r}: the file name must end in .png")

    def wrap(draw: Callable[[Section], Figure | None]) -> ReportFigure:
        text = caption if caption is not None else " ".join((inspect.getdoc(draw) or "").split())
        if not text:
            raise SpecError(f"figure {name!r}: give a caption (or a docstring)")
        return ReportFigure(name=name, title=title, caption=text, draw=draw)

    return wrap


def figures_of(module: types.ModuleType) -> list[ReportFigure]:
    """The figures a module defines (not those it imports), in the order it defines them."""
    return [
        found
        for found in vars(module).values()
        if isinstance(found, ReportFigure) and found.draw.__module__ == module.__name__
    ]


def collect(figures: Iterable[ReportFigure]) -> dict[str, ReportFigure]:
    """``{file name: figure}``, refusing two figures of one file name in one line."""
    out: dict[str, ReportFigure] = {}
    for found in figures:
        if found.name in out:
            raise SpecError(f"two report figures write {found.name!r}")
        out[found.name] = found
    return out


def user_figures(sources: Sequence[str | Path | ReportFigure]) -> list[ReportFigure]:
    """The figures of ``.py`` files (every :class:`ReportFigure` they define) and figures given.

    Raises
    ------
    SpecError
        If a file does not exist, fails to run, or defines no figure.
    """
    out = []
    for source in sources:
        if isinstance(source, ReportFigure):
            out.append(source)
            continue
        found = figures_of(_load_module(Path(source)))
        if not found:
            raise SpecError(f"{source}: defines no figure (decorate one with @figure)")
        out += found
    return out


def _load_module(path: Path) -> types.ModuleType:
    if path.suffix != ".py" or not path.is_file():
        raise SpecError(f"no such figure module {path} (a .py file)")
    name = f"observatory_figures_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise SpecError(f"{path}: {type(err).__name__}: {err}".splitlines()[0]) from None
    return module
