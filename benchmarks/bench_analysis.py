"""Throughput of the induction-score job on dask.distributed with 1 and 2 workers.

Scores every checkpoint of every seed of a trained family (default: the demo store; train it
first with ``observatory train runs/induction.toml``) with the head-score analysis, once on a
local cluster of 1 single-threaded worker and once on 2, and prints checkpoints/s and the
parallel efficiency (speed-up / workers).  Cluster start-up is excluded; result writing is
included.  Works on a copy, so the store itself is untouched.

    python benchmarks/bench_analysis.py [--store store/induction.zarr] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from distributed import Client, LocalCluster

from observatory.analysis.jobs import AnalysisSpec, ExecutionSpec, run_analysis


def timed_job(store: Path, workers: int, block_size: int) -> tuple[float, int]:
    """Seconds and checkpoints for one full induction-score job on ``workers`` workers."""
    spec = AnalysisSpec(
        store=str(store),
        analyses=("head_scores",),
        execution=ExecutionSpec(block_size=block_size),
    )
    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(workers)
        start = time.perf_counter()
        report = run_analysis(
            spec, scheduler=cluster.scheduler_address, recompute=True, progress=False
        )
        seconds = time.perf_counter() - start
    return seconds, report.computed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="store/induction.zarr")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "bench.zarr"
        shutil.copytree(args.store, store)
        rates = {}
        for workers in args.workers:
            seconds, n = timed_job(store, workers, args.block_size)
            rates[workers] = n / seconds
            rate = rates[workers]
            print(f"{workers} worker(s): {n} checkpoints in {seconds:6.1f} s = {rate:5.2f} ckpt/s")
    base = min(rates)
    for workers, rate in rates.items():
        if workers != base:
            speedup = rate / rates[base]
            efficiency = speedup / (workers / base)
            print(
                f"speed-up {base} -> {workers} workers: {speedup:.2f}x, "
                f"parallel efficiency {efficiency:.2f} (target >= 0.8)"
            )


if __name__ == "__main__":
    main()
