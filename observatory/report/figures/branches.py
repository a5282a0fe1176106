"""Figures of counterfactual branches: each branch beside the run or branch it was forked
from."""

from __future__ import annotations

from matplotlib.figure import Figure

from observatory.report.figures import common
from observatory.report.registry import Section, figure
from observatory.report.tables import intervention_text

PARENT_COLOUR = "0.55"


@figure("branches.png", title="Branches beside their parents")
def branches(section: Section) -> Figure | None:
    """Each branch (colour) against the run or branch it was forked from (grey): left, the
    per-step training loss; right, the induction score of the run's best induction head at
    each analysed checkpoint. The dotted line marks the fork: before it the branch is its
    parent (the same steps, read from the parent). An intervention that removes what the induction
    head needs (e.g. ablating the previous-token head it reads from) keeps the score low or
    moves its rise later.
    """
    found = section.branches
    if found is None or not found.sizes.get("branch"):
        return None
    labels = list(found["branch"].values)
    figure = Figure(figsize=(9.2, 3.2 * len(labels) + 0.4), layout="constrained")
    axes = figure.subplots(len(labels), 2, squeeze=False)
    for (loss_ax, score_ax), label in zip(axes, labels, strict=True):
        one = found.sel(branch=label)
        seed, fork = int(one["seed"]), int(one["fork"])
        parent = section.ds.sel(seed=seed) if seed in section.ds["seed"].values else None
        above = str(label).rpartition("/")[0]  # "seed0/a" for a branch "seed0/a/b" of "a"
        parent = found.sel(branch=above) if above in labels else parent
        row = section.result.per_seed.loc[seed] if seed in section.result.per_seed.index else None
        _loss_panel(loss_ax, one, parent, fork)
        _score_panel(score_ax, one, parent, row, fork)
        loss_ax.set_title(f"{label}: {intervention_text(str(one['intervention'].values))}")
    common.legend_below(figure, axes.ravel())
    return figure


def _loss_panel(ax, one, parent, fork: int) -> None:
    """The per-step loss of the branch and of its parent, the fork marked."""
    if parent is not None and "loss" in parent:
        loss = parent["loss"].dropna("train_step")
        ax.plot(loss["train_step"], loss, color=PARENT_COLOUR, lw=1, label="parent")
    loss = one["loss"].dropna("train_step")
    own = loss.sel(train_step=loss["train_step"] >= fork)
    ax.plot(own["train_step"], own, color=common.tab_colour(0), lw=1, label="branch")
    ax.axvline(fork, color="k", ls=":", lw=1, label="fork")
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss")


def _score_panel(ax, one, parent, row, fork: int) -> None:
    """The parent's best head's induction score in the branch and in the parent."""
    if row is None or row["best_layer"] < 0:
        ax.set_visible(False)
        return
    head = {"layer": int(row["best_layer"]), "head": int(row["best_head_in_layer"])}
    if parent is not None:
        score = common.analysed_only(parent["induction_score"].sel(head))
        ax.plot(score["step"], score, color=PARENT_COLOUR, marker=".", label="parent")
    score = common.analysed_only(one["induction_score"].sel(head))
    own = score.sel(step=score["step"] >= fork)
    ax.plot(own["step"], own, color=common.tab_colour(0), marker=".", label="branch")
    ax.axvline(fork, color="k", ls=":", lw=1, label="fork")
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel(f"induction score, {row['best_head']}")
