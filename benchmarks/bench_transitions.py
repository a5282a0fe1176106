"""How long ``observatory transitions`` takes on the demo family, after its analyses.

Trains the demo family (``runs/induction.toml``: 3 seeds, 1000 steps, 105 checkpoints each;
``--steps`` shortens it) into a temporary store and analyses it with ``per_token_loss`` and
``head_scores`` (what the command reads), then times, in this process: loading the results
(the baseline: the I/O any reader pays), discovery, matching and the groups' head ablations on
the loaded results, and the
whole command in a fresh process (``observatory transitions STORE``: imports, store, held-out
windows and all). Prints each time, the command's time against its target (<= 30 s on 2
cores), and what was found.

    python benchmarks/bench_transitions.py [--spec runs/induction.toml] [--steps 1000]
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from observatory.jobs.analyze import run_analysis
from observatory.jobs.job_spec import AnalysisSpec
from observatory.report.results import load_results
from observatory.report.transitions import held_out_windows, transition_table
from observatory.spec import load_run_spec
from observatory.train import train_family

TARGET_S = 30.0


def timed(function, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = function(*args, **kwargs)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="runs/induction.toml")
    parser.add_argument("--steps", type=int, default=None, help="steps to train (default: spec)")
    args = parser.parse_args()

    spec = load_run_spec(args.spec)
    if args.steps:
        spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, steps=args.steps))
    with tempfile.TemporaryDirectory() as directory:
        store = train_family(spec, store=Path(directory) / "bench.zarr", progress=False)
        job = AnalysisSpec(store=str(store), analyses=("head_scores", "per_token_loss"))
        run_analysis(job, progress=False)
        load_s, ds = timed(load_results, store, require=("per_token_loss",))
        windows = held_out_windows(ds)
        find_s, table = timed(transition_table, ds, windows=windows, ablation=True)
        command = [sys.executable, "-m", "observatory.cli", "transitions", str(store)]
        command_s, done = timed(subprocess.run, command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"observatory transitions failed: {done.stderr.strip()}")
    n_seeds = ds.sizes["seed"]
    n_tokens = ds.sizes["held_out"] * ds.sizes["loss_position"]
    print(f"demo family: {n_seeds} seeds x {ds.sizes['step']} checkpoints x {n_tokens} tokens")
    print(f"load results (baseline)       {load_s:7.2f} s")
    print(f"discovery, matching, ablation {find_s:7.2f} s   ({find_s / load_s:.2f} x loading)")
    print(
        f"observatory transitions       {command_s:7.2f} s   ({command_s / load_s:.2f} x loading)"
    )
    print(f"command / target ({TARGET_S:.0f} s)      {command_s / TARGET_S:7.2f}   (<= 1 required)")
    universal = table.loc[table["universal"], "transition"].nunique()
    print(f"found: {table['transition'].nunique()} transitions, {universal} in every seed")
    print(done.stdout)


if __name__ == "__main__":
    main()
