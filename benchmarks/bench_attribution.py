"""Attribution speed against replay's on the same run, the cost of per-example terms, and a
counterfactual check of the per-example terms.

Trains one run of the spec (default: the demo family's first size, into its induction
bump) into a temporary store, then, in this process and on the same span: replays it
(replay's steps/s), attributes the chosen induction head's score per step (attribution's
steps/s: one target forward and backward per visited state on top of the replay) and per
example (per-example gradients with ``torch.func`` and the AdamW preconditioner).  Prints
attribution/replay (target >= 0.4) and the per-example cost per step, with the residual of the
per-step sum.

The counterfactual check: ``--groups`` groups of the windows of the first ``--cf-span`` steps
of the span, chosen by their per-example attribution (the most positive ones in consecutive
groups of ``--group-size``, as many of the most negative ones, the rest drawn at random), each
dropped in a branch forked at the span's start and trained for those steps (the windows after
a dropped one move up, so each group is replaced by as many later windows).  For each group the
change of the target at the end (branch minus parent) is set against the change its
attribution predicts (minus the sum of its windows' contributions); prints the Spearman rank
correlation (target >= 0.5) with n and p.  The terms follow the weights along the trajectory
that was taken, not the dynamics that would correct a perturbation: over longer spans the
agreement fades (benchmarks/README.md has the figures).

    python benchmarks/bench_attribution.py [--spec runs/induction.toml] [--steps 300]
        [--span 40] [--layer 1] [--head 0] [--groups 20] [--group-size 16] [--cf-span 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr
from scipy.stats import spearmanr

import observatory as obs
from observatory.attribution.targets import choose, value_and_gradient
from observatory.jobs.analyze import shared_data
from observatory.jobs.job_spec import HeldOutSpec, ProbeSpec
from observatory.query import models_at
from observatory.spec import RunSpec, SeedSpec, load_run_spec
from observatory.train import Intervention, train_branch, train_family


def timed(function, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = function(*args, **kwargs)
    return time.perf_counter() - start, out


def window_groups(
    att: xr.Dataset, n_groups: int, size: int, rng: np.random.Generator
) -> list[tuple[str, np.ndarray, float]]:
    """``(kind, windows, predicted change)`` of each group: ``kind`` is ``top``, ``bottom``
    or ``random``; the prediction for dropping a group is minus its windows' contributions."""
    windows = att["example_index"].values.ravel()
    contributions = att["example_contribution"].values.ravel()
    if len(np.unique(windows)) != len(windows):
        raise SystemExit("a window occurs twice in the span: shorten it (one epoch at most)")
    ranked = np.argsort(-contributions, kind="stable")
    n_ranked = round(0.35 * n_groups)
    if 2 * n_ranked * size > len(windows):
        raise SystemExit(f"{2 * n_ranked} groups of {size} do not fit {len(windows)} windows")
    chosen = [("top", ranked[i * size : (i + 1) * size]) for i in range(n_ranked)]
    chosen += [("bottom", ranked[::-1][i * size : (i + 1) * size]) for i in range(n_ranked)]
    chosen += [
        ("random", rng.choice(len(windows), size, replace=False))
        for _ in range(n_groups - 2 * n_ranked)
    ]
    return [(kind, windows[rows], -float(contributions[rows].sum())) for kind, rows in chosen]


def counterfactual(spec: RunSpec, store: Path, att: xr.Dataset, groups: list) -> np.ndarray:
    """The measured change of the target at the end of ``att``'s span when each group is
    dropped: the target in a branch forked at the span's start without the group's windows
    minus the parent's."""
    size, start = att.attrs["size"], int(att["train_step"][0])
    stop = int(att["train_step"][-1]) + 1
    chosen = choose(att.attrs["target"], att.attrs["target_options"])
    data = shared_data(spec, ProbeSpec(), HeldOutSpec())

    def target_at_stop(branch: str) -> float:
        (_, model), *_ = models_at(store, size=size, seed=0, steps=[stop], branch=branch)
        return value_and_gradient(chosen, model, data, f"target at step {stop}")[0]

    parent = target_at_stop("")
    if parent != att.attrs["cf_parent"]:  # replay and the stored checkpoint agree bit for bit
        raise SystemExit(f"the parent's target {parent} is not attribution's at step {stop}")
    measured = []
    for i, (_, windows, _) in enumerate(groups):
        train_branch(
            spec,
            size=size,
            seed=0,
            at=start,
            name=f"drop{i}",
            intervention=Intervention(drop_windows=tuple(windows)),
            store=store,
            progress=False,
            stop_after=stop - start,
        )
        measured.append(target_at_stop(f"drop{i}") - parent)
    return np.array(measured)


def first_steps(att: xr.Dataset, n: int) -> xr.Dataset:
    """The per-example attribution of the first ``n`` steps of ``att``'s span (the terms of a
    step do not depend on the steps after it), with the parent's target at its end."""
    part = att.isel(train_step=slice(0, n))
    stop = int(att["train_step"][0]) + n
    at_stop = att["target_value"].sel(train_step=stop) if n < att.sizes["train_step"] else None
    parent = float(att["target_stop"] if at_stop is None else at_stop)
    return part.assign_attrs(cf_parent=parent)


def report_counterfactual(groups: list, measured: np.ndarray, seconds: float) -> None:
    predicted = np.array([p for _, _, p in groups])
    print(f"{'group':>5}  {'kind':<6}  {'windows':>7}  {'predicted':>11}  {'measured':>11}")
    for i, ((kind, windows, _), p, m) in enumerate(zip(groups, predicted, measured, strict=True)):
        print(f"{i:>5}  {kind:<6}  {len(windows):>7}  {p:>11.4g}  {m:>11.4g}")
    rho, p_value = spearmanr(predicted, measured)
    print(
        f"counterfactual: Spearman rho {rho:.3f} (n = {len(groups)}, p = {p_value:.2g}; "
        f"target >= 0.5) between the predicted and the measured change; "
        f"{len(groups)} branches in {seconds:.0f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="runs/induction.toml")
    parser.add_argument("--steps", type=int, default=300, help="steps to train")
    parser.add_argument("--span", type=int, default=40, help="steps to attribute (the last ones)")
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--head", type=int, default=0)
    parser.add_argument("--groups", type=int, default=20, help="groups of windows to drop")
    parser.add_argument("--group-size", type=int, default=16, help="windows per group")
    parser.add_argument(
        "--cf-span", type=int, default=10, help="steps the dropping branches train (from the start)"
    )
    args = parser.parse_args()
    if not 0 < args.cf_span <= args.span:
        parser.error(f"--cf-span: 1 to --span ({args.span}) steps")

    spec = load_run_spec(args.spec)
    start, stop = args.steps - args.span, args.steps
    spec = dataclasses.replace(
        spec,
        seeds=SeedSpec(init=(0,), data=(0,)),
        train=dataclasses.replace(spec.train, steps=args.steps),
        # checkpoints (each a keyframe) where the branches fork and where they are read
        checkpoints=dataclasses.replace(
            spec.checkpoints, extra=(start, start + args.cf_span, stop), state_every=1
        ),
    )
    size = spec.model.sizes[0].name
    with tempfile.TemporaryDirectory() as directory:
        store = train_family(spec, store=Path(directory) / "bench.zarr", progress=False)
        where = {"size": size, "seed": 0, "start": start, "stop": stop}
        replay_s, _ = timed(lambda: [None for _ in obs.replay(store, **where)])
        target = {"target": "induction_score", "options": {"layer": args.layer, "head": args.head}}
        step_s, att = timed(obs.attribute, store, **where, **target)
        example_s, examples = timed(obs.attribute, store, **where, **target, per_example=True)
        dropped = first_steps(examples, args.cf_span)
        groups = window_groups(dropped, args.groups, args.group_size, np.random.default_rng(0))
        branches_s, measured = timed(counterfactual, spec, store, dropped, groups)
    n = stop - start
    change = float(att["target_stop"] - att["target_start"])
    residual = float(att["residual"])
    print(
        f"model: {spec.model.architecture} {size}, batch {spec.train.batch_size}; "
        f"steps {start}..{stop}; target induction_score L{args.layer}H{args.head} "
        f"{float(att['target_start']):.4g} -> {float(att['target_stop']):.4g}"
    )
    print(f"replay:                 {n / replay_s:8.2f} steps/s")
    print(f"per-step attribution:   {n / step_s:8.2f} steps/s")
    print(f"attribution / replay:   {replay_s / step_s:8.3f} (target >= 0.4)")
    print(
        f"per-example attribution: {(example_s - step_s) / n * 1000:7.1f} ms per step on top "
        f"({n / example_s:.2f} steps/s in all)"
    )
    print(
        f"residual: {residual:.3g} of a change of {change:.3g} "
        f"({100 * abs(residual / change) if change else 0:.3g}%)"
    )
    print(f"counterfactual: steps {start}..{start + args.cf_span}")
    report_counterfactual(groups, measured, branches_s)


if __name__ == "__main__":
    main()
