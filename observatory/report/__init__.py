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

from observatory._lazy import lazy_attributes

# Imported from their module on first use: the CLI builds its parser from the options of
# report.transitions without paying for the figures, torch and transformers.
__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        "figures": "FIGURES",
        "registry": "ReportFigure Section figure",
        "results": "load_results",
        "summary": "Summary summarize token_loss_pca",
        "tables": "size_comparison",
        "write": "write_report",
    },
)

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
