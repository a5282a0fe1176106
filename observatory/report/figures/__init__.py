"""The report's built-in figures, one module per theme; each figure declares itself.

A figure is one function decorated with :func:`~observatory.report.registry.figure` (file
name and title; its docstring is the caption) in the module of its theme; :data:`FIGURES`
collects them in the order of the modules below and of the functions in each, which is their
order on the page. Drawing helpers they share are in ``common``.
"""

from observatory.report.figures import (
    attribution,
    branches,
    causal,
    dynamics,
    heads,
    llc,
    losses,
    transitions,
)
from observatory.report.registry import ReportFigure, collect, figures_of

FIGURES: dict[str, ReportFigure] = collect(
    found
    for module in (losses, heads, causal, llc, branches, attribution, dynamics, transitions)
    for found in figures_of(module)
)

__all__ = ["FIGURES"]
