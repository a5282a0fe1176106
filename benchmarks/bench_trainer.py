"""Trainer speed with dense checkpoints vs a bare PyTorch loop, and bytes on disk per checkpoint.

The bare loop is the trainer's own ``train_step`` on a second copy of the model; bytes on disk
are reported with the optimizer state at every checkpoint and at every 8th (``state_every``).

The two loops run in lock-step in this process: before each trainer step, the trainer's
``on_batch`` hook runs one step of a bare loop (a second copy of the same model and optimizer,
with no checkpoints, metrics or store) on the same batch, and times it.  This machine's speed
drifts by 10% and more from one second to the next, more than the effect measured; stepping
the two loops in turn exposes both to the same drift.  The trainer's time is its wall time
(first step to last commit, the final flush included) less the bare steps.

The writer thread runs beside both loops, so some of its cost lands on the bare steps.  The
conservative ratio therefore adds, in full, the time a writer takes to store the same run with
nothing else running (replayed from the trained store) to the trainer's time, as if none of
the writing had overlapped training.

    python benchmarks/bench_trainer.py [--spec runs/induction.toml] [--steps 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from observatory.data import build_corpus
from observatory.models import build_model
from observatory.spec import load_run_spec
from observatory.store import FamilyStore, RunWriter, StepRecord, create_family
from observatory.train import train_run, train_step


class BareLoop:
    """The plain training step of the trainer's model: no checkpoints, metrics or store."""

    def __init__(self, spec, run):
        self.spec = spec
        self.model = build_model(spec.model, spec.model.sizes[0], init_seed=run.init_seed)
        self.optimizer = spec.optimizer.build(self.model)
        self.seconds = 0.0

    def __call__(self, step: int, tokens: torch.Tensor) -> None:
        start = time.perf_counter()
        loss, _ = train_step(
            self.model,
            self.optimizer,
            tokens,
            lr=self.spec.optimizer.lr_at(step, self.spec.train.steps),
            grad_clip=self.spec.optimizer.grad_clip,
        )
        loss.item()
        self.seconds += time.perf_counter() - start


def lockstep_round(spec, corpus, store: Path) -> tuple[float, float]:
    """Seconds of the bare loop and of the trainer, stepped in turn, for one run of the spec."""
    run = spec.runs()[0]
    bare = BareLoop(spec, run)
    root = create_family(store, spec, data={"fingerprint": corpus.fingerprint})
    summary = train_run(spec, run, root, corpus, progress=False, on_batch=bare)
    return bare.seconds, summary.seconds - bare.seconds


def replay_writer_seconds(spec, store: Path, replay: Path) -> float:
    """Seconds a :class:`RunWriter` takes to store a trained run again, alone on the machine."""
    run_id = spec.runs()[0]
    run = FamilyStore(store).run(run_id.size, run_id.seed)
    checkpoints = {int(step): run.checkpoint(int(step)) for step in run.steps()}
    metrics = run.metrics()
    records = [
        StepRecord(
            step=step,
            loss=float(metrics["loss"][step]),
            lr=float(metrics["lr"][step]),
            grad_norm=float(metrics["grad_norm"][step]),
            tokens_seen=int(metrics["train_tokens"][step]),
            batch_indices=run.batch_indices(step),
        )
        for step in range(run.n_steps)
    ]
    first = next(iter(checkpoints.values()))
    writer = RunWriter(
        create_family(replay, spec, data={"fingerprint": "replay"}),
        run_id,
        spec,
        param_shapes={name: array.shape for name, array in first.params.items()},
        d_head=spec.size(run_id.size).d_head,
        schedule=tuple(checkpoints),
        rng_bytes=first.rng_state.size,
        data_order_fingerprint="replay",
    )
    start = time.perf_counter()
    writer.start()
    for step in range(run.n_steps + 1):  # in the trainer's order: checkpoint, then the step
        if step in checkpoints:
            writer.put_checkpoint(checkpoints[step])
        if step < run.n_steps:
            writer.put_step(records[step])
    writer.close(complete=True)
    return time.perf_counter() - start


def disk_figures(store: Path, spec) -> list[str]:
    """Bytes on disk per checkpoint against raw float32, and per training step."""
    family = FamilyStore(store)
    run = family.run(spec.model.sizes[0].name, 0)
    n_ckpt = run.n_checkpoints
    param_bytes = sum(a.nbytes for a in run.parameters_at(int(run.steps()[0])).values())
    raw_state = 3 * param_bytes + run.group["state/rng_state"].shape[1]  # + 2 AdamW moments
    run_disk = family.disk_bytes(run.run.path)
    weights_disk = sum(family.disk_bytes(f"{run.run.path}/{n}") for n in run.parameter_names)
    checkpoint_disk = weights_disk + family.disk_bytes(f"{run.run.path}/state")
    per_step = run_disk - checkpoint_disk
    return [
        f"checkpoints per run: {n_ckpt}",
        f"weights on disk per checkpoint: {weights_disk / n_ckpt / 1e3:.1f} kB vs raw float32 "
        f"{param_bytes / 1e3:.1f} kB -> ratio {weights_disk / n_ckpt / param_bytes:.3f}",
        f"full checkpoint (weights + AdamW + RNG) on disk: {checkpoint_disk / n_ckpt / 1e3:.1f} "
        f"kB vs raw {raw_state / 1e3:.1f} kB -> ratio {checkpoint_disk / n_ckpt / raw_state:.3f}",
        f"per-step records (metrics + batch indices): {per_step / run.n_steps:.0f} bytes/step",
    ]


def keyframe_figures(spec, corpus, tmp: Path, *, dense: Path, state_every: int = 8) -> list[str]:
    """Bytes on disk per checkpoint with the state at every checkpoint and every 8th."""
    sparse_spec = dataclasses.replace(
        spec, checkpoints=dataclasses.replace(spec.checkpoints, state_every=state_every)
    )
    sparse = tmp / f"state_every{state_every}.zarr"
    root = create_family(sparse, sparse_spec, data={"fingerprint": corpus.fingerprint})
    train_run(sparse_spec, sparse_spec.runs()[0], root, corpus, progress=False)
    lines, per_checkpoint = [], {}
    for every, store in ((spec.checkpoints.state_every, dense), (state_every, sparse)):
        family = FamilyStore(store)
        run = family.run(spec.model.sizes[0].name, 0)
        per_checkpoint[every] = family.disk_bytes(run.run.path) / run.n_checkpoints
        lines.append(
            f"state_every = {every}: {len(run.keyframe_steps())} keyframes of "
            f"{run.n_checkpoints} checkpoints, {per_checkpoint[every] / 1e3:.1f} kB on disk per "
            "checkpoint (the whole run's bytes / checkpoints)"
        )
    ratio = per_checkpoint[state_every] / per_checkpoint[spec.checkpoints.state_every]
    return [*lines, f"bytes per checkpoint, state_every = {state_every} vs 1: ratio {ratio:.3f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="runs/induction.toml")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    spec = load_run_spec(args.spec)
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, steps=args.steps))
    corpus = build_corpus(spec.data, context=spec.train.context, vocab_size=spec.model.vocab_size)
    steps = spec.train.steps
    print(f"model: {spec.model.architecture} {spec.model.sizes[0]}")
    print(
        f"steps: {steps}, default checkpoint schedule of {args.spec}, torch threads: "
        f"{spec.train.threads}"
    )
    ratios, conservative = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.rounds):
            store = Path(tmp) / f"round{index}.zarr"
            bare, trainer = lockstep_round(spec, corpus, store)
            writer = replay_writer_seconds(spec, store, Path(tmp) / f"replay{index}.zarr")
            ratios.append(bare / trainer)
            conservative.append(bare / (trainer + writer))
            print(
                f"round {index}: bare loop {steps / bare:5.1f} steps/s, trainer "
                f"{steps / trainer:5.1f} steps/s; writer alone {writer:.2f} s -> ratio "
                f"{ratios[-1]:.3f}, conservative {conservative[-1]:.3f}",
                flush=True,
            )
        figures = disk_figures(store, spec)
        figures += keyframe_figures(spec, corpus, Path(tmp), dense=store)
    print(
        f"speed ratio trainer/bare, median of {args.rounds} rounds: "
        f"{statistics.median(ratios):.3f} (target >= 0.95); conservative, with the writer's "
        f"time added in full: {statistics.median(conservative):.3f}"
    )
    print("\n".join(figures))


if __name__ == "__main__":
    main()
