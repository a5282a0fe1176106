"""A circuit-formation report of one family store: PNG figures, HTML pages, summary tables.

``write_report`` (:mod:`~observatory.report.write`) draws every figure of
:mod:`~observatory.report.figures` (each declared with :func:`figure`, file name, title and
caption beside its drawing code) and a user's figures, and writes the static page
(:mod:`~observatory.report.page`), its interactive twin (:mod:`~observatory.report.interactive`)
and the summary tables (computed in :mod:`~observatory.report.summary`, formatted in
:mod:`~observatory.report.tables`) of the results :func:`load_results` reads
(:mod:`~observatory.report.results`, which also holds ``obs.summary``: load and summarise),
and, for a store, the attributions stored in its runs
(:mod:`~observatory.report.attribution`).

Figures are drawn on bare :class:`matplotlib.figure.Figure` objects (Agg canvas), so writing a
report never touches pyplot's global state or the user's interactive backend.
"""

from observatory.report.figures import FIGURES
from observatory.report.registry import ReportFigure, Section, figure
from observatory.report.results import load_results
from observatory.report.summary import Summary, summarize, token_loss_pca
from observatory.report.tables import size_comparison
from observatory.report.write import write_report

__all__ = [
    "FIGURES",
    "ReportFigure",
    "Section",
    "Summary",
    "figure",
    "load_results",
    "size_comparison",
    "summarize",
    "token_loss_pca",
    "write_report",
]
