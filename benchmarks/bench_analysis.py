"""Throughput of the induction-score job on dask.distributed with 1 and 2 workers, and the
cost of a user analysis against the same computation as a built-in.

Scores every checkpoint of every seed of a trained family (default: the demo store; train it
first with ``observatory train runs/induction.toml``) with the head-score analysis on a local
cluster of 1 single-threaded worker and on one of 2, and prints checkpoints/s and the parallel
efficiency (speed-up / workers).  Start-up is excluded: each cluster runs the whole job once
untimed (workers import torch and transformers and build their first model), then the timed
jobs.  Result writing is included.  Works on a copy, so the store itself is untouched.

The second part times, on one worker, the built-in ``head_scores`` and a user analysis in a
file (shipped to the worker as source, like any ``"file.py:name"`` analysis) that computes the
same scores with the same pure functions, in turn, and prints the seconds per checkpoint of
each and their ratio (user / built-in; target <= 1, noise of a few percent either way).

This machine's speed drifts by 10% and more within seconds.  Each round therefore times
``--repeats`` jobs per worker count and keeps the fastest, the worker counts run back to back,
each round gives its own efficiency, and the median over rounds is the figure to read.

    python benchmarks/bench_analysis.py [--store store/induction.zarr] [--workers 1 2]
                                        [--rounds 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from distributed import Client, LocalCluster

from observatory.jobs.analyze import run_analysis
from observatory.jobs.job_spec import AnalysisSpec, ExecutionSpec

# The built-in head_scores, written as a user would: the same pure functions, same outputs.
CUSTOM = '''\
import observatory as obs
from observatory.analysis import attention_patterns, head_scores

SCORES = ("induction", "previous_token", "duplicate_token")
HEADS = ("layer", "head")


@obs.analysis(
    variables={f"{p}{s}_score": HEADS for p in ("my_", "my_tl_") for s in SCORES}
)
def my_head_scores(model, data):
    """head_scores, as a user analysis."""
    patterns = attention_patterns(model, data.probe_tokens)
    out = {}
    for prefix, convention in (("my_", "prefix_matching"), ("my_tl_", "transformer_lens")):
        scores = head_scores(patterns, data.probe_tokens, convention=convention)
        out |= {f"{prefix}{s}_score": scores[s] for s in SCORES}
    return out
'''


def timed_jobs(
    store: Path, workers: int, block_size: int, repeats: int, analyses=(("head_scores",),)
) -> tuple[list[float], int]:
    """Fastest of ``repeats`` jobs per entry of ``analyses`` on ``workers`` workers, after a
    warm-up job each; the entries' jobs run in turn, each first in every other repeat, so
    drift and the order hit them alike.

    Returns
    -------
    tuple
        (seconds per entry, checkpoints scored per job).
    """
    specs = [
        AnalysisSpec(
            store=str(store), analyses=names, execution=ExecutionSpec(block_size=block_size)
        )
        for names in analyses
    ]
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.CRITICAL,  # as run_analysis's own cluster: no shutdown noise
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(workers)
        times: list[list[float]] = [[] for _ in specs]
        for repeat in range(1 + repeats):  # the first job warms the workers up
            pairs = list(zip(specs, times, strict=True))
            for spec, spent in pairs if repeat % 2 else pairs[::-1]:  # each goes first in turn
                start = time.perf_counter()
                report = run_analysis(
                    spec, scheduler=cluster.scheduler_address, recompute=True, progress=False
                )
                spent.append(time.perf_counter() - start)
    return [min(spent[1:]) for spent in times], report.computed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="store/induction.zarr")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="timed jobs per cluster")
    args = parser.parse_args()

    base, *others = sorted(args.workers)
    efficiencies: dict[int, list[float]] = {workers: [] for workers in others}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "bench.zarr"
        shutil.copytree(args.store, store)
        for index in range(args.rounds):
            rates = {}
            for workers in (base, *others):
                [seconds], n = timed_jobs(store, workers, args.block_size, args.repeats)
                rates[workers] = n / seconds
                print(
                    f"round {index}, {workers} worker(s): {n} checkpoints in {seconds:5.1f} s "
                    f"= {rates[workers]:5.1f} ckpt/s",
                    flush=True,
                )
            for workers in others:
                efficiencies[workers].append(rates[workers] / rates[base] / (workers / base))
        for workers, values in efficiencies.items():
            print(
                f"parallel efficiency {base} -> {workers} workers, median of {args.rounds} "
                f"rounds: {statistics.median(values):.2f} (target >= 0.8); per round: "
                + ", ".join(f"{value:.2f}" for value in values),
                flush=True,
            )
        custom_vs_builtin(store, args)


def custom_vs_builtin(store: Path, args: argparse.Namespace) -> None:
    """Seconds per checkpoint of head_scores as a built-in and as a user analysis file."""
    code = store.parent / "my_analyses.py"
    code.write_text(CUSTOM)
    ratios = []
    for index in range(args.rounds):
        (builtin, custom), n = timed_jobs(
            store, 1, args.block_size, args.repeats, (("head_scores",), (f"{code}:my_head_scores",))
        )
        ratios.append(custom / builtin)
        print(
            f"round {index}, 1 worker: built-in head_scores {1e3 * builtin / n:.1f} ms/ckpt, "
            f"the same as a user analysis {1e3 * custom / n:.1f} ms/ckpt",
            flush=True,
        )
    print(
        f"user analysis / built-in, per checkpoint, median of {args.rounds} rounds: "
        f"{statistics.median(ratios):.2f} (target <= 1); per round: "
        + ", ".join(f"{ratio:.2f}" for ratio in ratios)
    )


if __name__ == "__main__":
    main()
