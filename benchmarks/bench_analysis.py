"""Throughput of the induction-score job on dask.distributed with 1 and 2 workers.

Scores every checkpoint of every seed of a trained family (default: the demo store; train it
first with ``observatory train runs/induction.toml``) with the head-score analysis on a local
cluster of 1 single-threaded worker and on one of 2, and prints checkpoints/s and the parallel
efficiency (speed-up / workers).  Start-up is excluded: each cluster runs the whole job once
untimed (workers import torch and transformers and build their first model), then the timed
jobs.  Result writing is included.  Works on a copy, so the store itself is untouched.

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

from observatory.jobs import AnalysisSpec, ExecutionSpec, run_analysis


def timed_jobs(store: Path, workers: int, block_size: int, repeats: int) -> tuple[float, int]:
    """Fastest of ``repeats`` induction-score jobs on ``workers`` workers, after a warm-up job.

    Returns
    -------
    tuple
        (seconds, checkpoints scored per job).
    """
    spec = AnalysisSpec(
        store=str(store),
        analyses=("head_scores",),
        execution=ExecutionSpec(block_size=block_size),
    )
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
        times = []
        for _ in range(1 + repeats):  # the first job warms the workers up
            start = time.perf_counter()
            report = run_analysis(
                spec, scheduler=cluster.scheduler_address, recompute=True, progress=False
            )
            times.append(time.perf_counter() - start)
    return min(times[1:]), report.computed


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
                seconds, n = timed_jobs(store, workers, args.block_size, args.repeats)
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
            f"parallel efficiency {base} -> {workers} workers, median of {args.rounds} rounds: "
            f"{statistics.median(values):.2f} (target >= 0.8); per round: "
            + ", ".join(f"{value:.2f}" for value in values)
        )


if __name__ == "__main__":
    main()
