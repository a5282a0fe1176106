"""What the built-in analyses declare, as the report reads it: variables and heatmaps.

The report never keeps its own list of variables: it loads what the store holds
(:func:`~observatory.report.results.load_results`) and asks the analyses' declarations
(``@analysis(variables=..., heatmaps=...)`` in :mod:`observatory.analysis.builtins`) which
analysis writes a variable and how a per-head variable is drawn.
"""

from __future__ import annotations

import functools

import xarray as xr

from observatory.analysis.protocol import Heatmap


@functools.cache
def builtin_variables() -> dict[str, str]:
    """``{variable: analysis}`` of every variable a built-in writes with its default options.

    Options change a built-in's dims, never its variables' names (``head_scores`` writes its
    ``tl_*`` scores by default).
    """
    from observatory.analysis.builtins import BUILTINS

    return {variable: found.name for found in BUILTINS.values() for variable in found.declared()}


@functools.cache
def heatmaps() -> dict[str, Heatmap]:
    """``{variable: Heatmap}`` of every per-head variable a built-in declares a heatmap for."""
    from observatory.analysis.builtins import BUILTINS

    return {
        variable: heatmap
        for found in BUILTINS.values()
        for variable, heatmap in found.heatmaps.items()
    }


def analysis_of(variable: str, ds: xr.Dataset) -> str:
    """The analysis that writes ``variable``: as stored with it, else as a built-in declares."""
    if variable in ds and "analysis" in ds[variable].attrs:
        return str(ds[variable].attrs["analysis"])
    return builtin_variables().get(variable, variable)
