"""Attribution speed against replay's on the same run, and the cost of per-example terms.

Trains one run of the spec (default: the demo family's first size, shortened) into a temporary
store, then, in this process and on the same span: replays it (replay's steps/s), attributes
the best-guess induction head's score per step (attribution's steps/s: one target forward and
backward per visited state on top of the replay) and per example (per-example gradients with
``torch.func`` and the AdamW preconditioner).  Prints attribution/replay (target >= 0.4) and
the per-example cost per step, with the residual of the per-step sum.

    python benchmarks/bench_attribution.py [--spec runs/induction.toml] [--steps 60]
        [--span 40] [--layer 1] [--head 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import observatory as obs
from observatory.spec import SeedSpec, load_run_spec
from observatory.train import train_family


def timed(function, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = function(*args, **kwargs)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="runs/induction.toml")
    parser.add_argument("--steps", type=int, default=60, help="steps to train")
    parser.add_argument("--span", type=int, default=40, help="steps to attribute (the last ones)")
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--head", type=int, default=0)
    args = parser.parse_args()

    spec = load_run_spec(args.spec)
    spec = dataclasses.replace(
        spec,
        seeds=SeedSpec(init=(0,), data=(0,)),
        train=dataclasses.replace(spec.train, steps=args.steps),
    )
    size = spec.model.sizes[0].name
    start, stop = args.steps - args.span, args.steps
    with tempfile.TemporaryDirectory() as directory:
        store = train_family(spec, store=Path(directory) / "bench.zarr", progress=False)
        where = {"size": size, "seed": 0, "start": start, "stop": stop}
        replay_s, _ = timed(lambda: [None for _ in obs.replay(store, **where)])
        target = {"target": "induction_score", "options": {"layer": args.layer, "head": args.head}}
        step_s, att = timed(obs.attribute, store, **where, **target)
        example_s, _ = timed(obs.attribute, store, **where, **target, per_example=True)
    n = stop - start
    change = float(att["target_stop"] - att["target_start"])
    residual = float(att["residual"])
    print(
        f"model: {spec.model.architecture} {size}, batch {spec.train.batch_size}; "
        f"steps {start}..{stop}"
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


if __name__ == "__main__":
    main()
