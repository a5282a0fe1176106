"""The report's training-dynamics section: what each update moved, around the loss bump.

Dynamics are measured on demand (``observatory dynamics``, :func:`~observatory.attribution.
dynamics.measure_dynamics`), never by the report: it shows every result stored in the runs of
the seeds it draws (``<run>/dynamics/<name>``), ordered by seed and then name, one table row
each (span, median update ratio and cosine of consecutive updates, the heads that moved most)
beside its figure. Where the seeds drawn hold none, the section is one line: the command that
measures the dynamics across a seed's loss bump.
"""

from __future__ import annotations

import html
import math
import shlex
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import xarray as xr

from observatory.report.attribution import bump_seed, bump_span
from observatory.report.results import stored_results
from observatory.report.summary import Summary, head_label

N_HEADS = 3  # heads named as those that moved most


@dataclass(frozen=True, eq=False)
class Dynamics:
    """The training dynamics the report shows for one size.

    Attributes
    ----------
    results
        Each stored result of the seeds drawn, as read by
        :func:`~observatory.attribution.dynamics.dynamics` (``attrs``: ``seed``, ``name``,
        ``start``, ``stop``), ordered by seed and name.
    command, purpose
        The ``observatory dynamics`` command line across a seed's loss bump, and what it
        measures in words (what the page shows without results).
    """

    results: list[xr.Dataset]
    command: str
    purpose: str


def load_dynamics(ds: xr.Dataset, result: Summary) -> Dynamics:
    """The stored dynamics of the seeds of ``ds``, and the command that measures them.

    Parameters
    ----------
    ds
        Results of one size of a store (``attrs``: ``store``, ``size``), as from
        :func:`~observatory.report.results.load_results`, restricted to the seeds drawn.
    result
        Their summary (loss bumps) for the command.

    Returns
    -------
    Dynamics
        Listing the runs' dynamics groups is all a store without dynamics costs.
    """
    from observatory.store import DYNAMICS

    stored = stored_results(ds, DYNAMICS)
    results = []
    if stored:  # the attribution package (torch, the replay) only where there is something
        from observatory.attribution.dynamics import dynamics

        store, size = ds.attrs["store"], str(ds.attrs["size"])
        results = [dynamics(store, size=size, seed=seed, name=name) for seed, name in stored]
    return Dynamics(results, *dynamics_command(ds, result))


def dynamics_command(ds: xr.Dataset, result: Summary) -> tuple[str, str]:
    """The command that measures the training dynamics across a seed's loss bump.

    Returns
    -------
    command : str
        ``observatory dynamics STORE --size S --seed K --start A --stop B`` for the seed
        :func:`~observatory.report.attribution.attribute_command` attributes, ``A`` and ``B``
        its bump's first and last step (placeholders without a bump).
    purpose : str
        What it measures, in words.
    """
    seed, row = bump_seed(ds, result)
    start, stop, where = bump_span(row)
    words = ["observatory", "dynamics", str(ds.attrs["store"]), "--size", str(ds.attrs["size"])]
    words += ["--seed", str(seed), "--start", start, "--stop", stop]
    return shlex.join(words), f"what each update of seed {seed} moved {where}"


def result_label(dyn: xr.Dataset) -> str:
    """A result in a few words: seed, stored name (where not the default) and span."""
    start, stop = int(dyn.attrs["start"]), int(dyn.attrs["stop"])
    name = str(dyn.attrs["name"])
    stored = f" ({name})" if name != f"steps_{start}_{stop}" else ""
    return f"seed {int(dyn.attrs['seed'])}{stored}, updates {start}-{stop - 1}"


def dynamics_table(found: Dynamics) -> pd.DataFrame:
    """One row per result: its span, the medians of the whole model's update ratio and of the
    cosine of consecutive updates (finite values), and the :data:`N_HEADS` heads that moved
    most (largest ``head_update_ratio`` summed over the span), with their summed ratios."""
    from observatory.attribution.dynamics import finite_median, moved_heads

    rows = []
    for dyn in found.results:
        heads = moved_heads(dyn, N_HEADS)
        rows.append(
            {
                "seed": int(dyn.attrs["seed"]),
                "name": str(dyn.attrs["name"]),
                "start": int(dyn.attrs["start"]),
                "stop": int(dyn.attrs["stop"]),
                "median_update_ratio": finite_median(dyn["update_ratio"].values),
                "median_update_cosine": finite_median(dyn["update_cosine"].values),
                "moved_heads": " ".join(head_label(layer, head) for layer, head, _ in heads),
                "moved_head_ratios": " ".join(f"{summed:.6g}" for _, _, summed in heads),
            }
        )
    return pd.DataFrame(rows)


def write_dynamics(found: Dynamics, out: Path) -> list[Path]:
    """``dynamics.csv``: :func:`dynamics_table` (nothing without results)."""
    if not found.results:
        return []
    dynamics_table(found).to_csv(out / "dynamics.csv", index=False)
    return [out / "dynamics.csv"]


def dynamics_html(found: Dynamics, sub: str) -> list[str]:
    """The section as HTML, every text escaped: what goes above its figure."""
    heading = f"<{sub} id='dynamics'>Training dynamics</{sub}>"
    if not found.results:
        return [
            heading,
            f"<p class='note'>No training dynamics stored for these seeds; to measure "
            f"{html.escape(found.purpose)}, run <code>{html.escape(found.command)}</code></p>",
        ]
    table = dynamics_table(found)
    shown = pd.DataFrame(
        {
            "seed": table["seed"].astype(str),
            "name": table["name"],
            "updates": [f"{a}-{b - 1}" for a, b in zip(table["start"], table["stop"], strict=True)],
            "median update ratio": table["median_update_ratio"].map(_number),
            "median cosine": table["median_update_cosine"].map(_number),
            f"{N_HEADS} heads that moved most (summed ratio)": [
                ", ".join(
                    f"{head} ({float(ratio):.3g})"
                    for head, ratio in zip(heads.split(), ratios.split(), strict=True)
                )
                for heads, ratios in zip(
                    table["moved_heads"], table["moved_head_ratios"], strict=True
                )
            ],
        }
    )
    return [
        heading,
        "<p class='note'>Every training-dynamics result stored in the runs shown (measured "
        "with <code>observatory dynamics</code>), by seed and name: the median over its "
        "updates of the whole model's update ratio |w(k+1) - w(k)| / |w(k)| and of the cosine "
        "between consecutive updates, and the heads whose update ratio summed over the span "
        "is largest; in dynamics.csv, and per step and block with obs.dynamics.</p>",
        shown.to_html(index=False, border=0),
    ]


def _number(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3g}"
