"""Deterministic training of a model family, with dense checkpoints in one zarr store.

- :mod:`~observatory.train.family`: :func:`train_family`, the runs of a family, in this
  process or on dask.distributed;
- :mod:`~observatory.train.loop`: :func:`train_run`, the training loop of one run;
- :mod:`~observatory.train.step`: :func:`train_step`, the one optimizer step that training and
  replay share, and the training state and numerics around it;
- :mod:`~observatory.train.budget`: the memory and disk checks before training;
- :mod:`~observatory.train.interrupts`: Ctrl-C or SIGTERM stops at a step boundary;
- :mod:`~observatory.train.replay`: exact replay of a run between its checkpoints;
- :mod:`~observatory.train.interventions`: what a counterfactual branch changes, and the
  course (batches, learning rates, hooks) every step of a run or branch takes;
- :mod:`~observatory.train.branch`: :func:`train_branch`, a run (or a branch) continued from
  a step with an intervention; :func:`train_branches`, several, in this process or on dask.
"""

from observatory.train.branch import train_branch, train_branches
from observatory.train.budget import check_budget
from observatory.train.family import train_family
from observatory.train.interrupts import (
    Interrupted,
    interrupts_between_steps,
    raise_if_interrupted,
)
from observatory.train.interventions import Intervention
from observatory.train.loop import RunSummary, train_run
from observatory.train.step import recipe, recipe_record, restore, snapshot, train_step

__all__ = [
    "Interrupted",
    "Intervention",
    "RunSummary",
    "check_budget",
    "interrupts_between_steps",
    "raise_if_interrupted",
    "recipe",
    "recipe_record",
    "restore",
    "snapshot",
    "train_branch",
    "train_branches",
    "train_family",
    "train_run",
    "train_step",
]
