"""Replay speed against the trainer's on the same run, and the time of ``observatory verify``.

Each round trains one run of the spec into a fresh store (the trainer's steps/s, from its first
step to its last commit) and then replays the whole run from step 0 from that store (replay's
steps/s, the corpus already built); the ratio replay/trainer is taken per round and the median
reported (target >= 0.9: replay does strictly less work than training).  The two are timed one
after the other, so a machine whose speed drifts adds noise: run it on a quiet machine.

Then ``observatory verify`` (checksums, ledger and replay of every segment) is timed on the
demo store with a local cluster of 1 and of 2 workers.

    python benchmarks/bench_replay.py [--spec runs/induction.toml] [--steps 1000] [--rounds 3]
        [--store store/induction.zarr]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import observatory as obs
from observatory.data import build_corpus
from observatory.jobs.verify import verify_store
from observatory.spec import load_run_spec
from observatory.store import FamilyStore, create_family
from observatory.train import train_run
from observatory.train.replay import stored_corpus


def replay_round(spec, corpus, store: Path) -> tuple[float, float]:
    """Steps/s of the trainer and of replay, on one run of ``spec``."""
    run = spec.runs()[0]
    root = create_family(store, spec, data={"fingerprint": corpus.fingerprint})
    summary = train_run(spec, run, root, corpus, progress=False)
    stored_corpus(FamilyStore(store))  # built once, as the trainer's was
    start = time.perf_counter()
    steps = 0
    for step, _ in obs.replay(store, size=run.size, seed=run.seed, start=0, stop=summary.steps):
        steps = step
    replay_seconds = time.perf_counter() - start
    return summary.steps / summary.seconds, steps / replay_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="runs/induction.toml")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", default="store/induction.zarr", help="demo store to verify")
    args = parser.parse_args()

    spec = load_run_spec(args.spec)
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, steps=args.steps))
    corpus = build_corpus(spec.data, context=spec.train.context, vocab_size=spec.model.vocab_size)
    print(f"model: {spec.model.architecture} {spec.model.sizes[0]}; {args.steps} steps")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.rounds):
            trainer, replay = replay_round(spec, corpus, Path(tmp) / f"round{index}.zarr")
            ratios.append(replay / trainer)
            print(
                f"round {index}: trainer {trainer:5.1f} steps/s, replay {replay:5.1f} steps/s "
                f"-> ratio {ratios[-1]:.3f}",
                flush=True,
            )
    print(
        f"replay/trainer, median of {args.rounds} rounds: {statistics.median(ratios):.3f} "
        "(target >= 0.9)"
    )

    if not Path(args.store).exists():
        print(f"no demo store at {args.store}: train it (observatory train runs/induction.toml)")
        return
    family = FamilyStore(args.store)
    steps = sum(family.run(r.size, r.seed).n_steps for r in family.runs())
    for workers in (1, 2):
        start = time.perf_counter()
        verdicts = verify_store(args.store, workers=workers, progress=False)
        seconds = time.perf_counter() - start
        failed = [v.failure for v in verdicts if v.failure]
        print(
            f"observatory verify {args.store}, {workers} worker(s): {seconds:.1f} s for "
            f"{len(verdicts)} runs, {steps} steps replayed "
            f"({'FAILED: ' + failed[0] if failed else 'all ok'})",
            flush=True,
        )


if __name__ == "__main__":
    main()
