"""Trainer speed with dense checkpoints vs a bare PyTorch loop, and bytes on disk per checkpoint.

Both loops train the same model on the same batches in this process; the trainer also writes
its default dense checkpoint schedule (weights, AdamW moments, RNG state), per-step metrics and
data indices to a zarr store.  Rounds alternate (bare, trainer, bare, trainer, ...) and the best
time of each is kept, and the median of the per-round ratios is printed too, so a noisy
neighbour hurts both alike.

    python benchmarks/bench_trainer.py [--spec runs/induction.toml] [--steps 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from observatory.data import batch_indices
from observatory.spec import load_run_spec
from observatory.store import FamilyStore, create_family
from observatory.trainer import train_run


def bare_loop(spec, corpus) -> float:
    """Seconds for the plain training loop: no checkpoints, no metrics, no store."""
    run = spec.runs()[0]
    model = spec.model.build(spec.model.sizes[0], init_seed=run.init_seed)
    optimizer = spec.optimizer.build(model)
    batches = [
        corpus.batch(
            batch_indices(
                data_seed=run.data_seed,
                step=step,
                batch_size=spec.train.batch_size,
                dataset_size=len(corpus),
            )
        )
        for step in range(spec.train.steps)
    ]
    start = time.perf_counter()
    for step, tokens in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = spec.optimizer.lr_at(step, spec.train.steps)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.optimizer.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
    return time.perf_counter() - start


def trainer_run(spec, corpus, directory: Path) -> tuple[float, float, Path]:
    """Seconds for observatory's trainer (one run): in all, and from its first step on.

    Both include the final flush to disk. "From its first step" leaves out the one-time
    set-up (store and array creation, model and optimizer construction) that the bare loop's
    timing leaves out too.
    """
    store = directory / f"bench-{time.monotonic_ns()}.zarr"
    first_step: list[float] = []

    def clock(step: int, _tokens) -> None:
        if step == 0:
            first_step.append(time.perf_counter())

    start = time.perf_counter()
    root = create_family(store, spec, data={"fingerprint": corpus.fingerprint})
    train_run(spec, spec.runs()[0], root, corpus, progress=False, on_batch=clock)
    end = time.perf_counter()
    return end - start, end - first_step[0], store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="runs/induction.toml")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    spec = load_run_spec(args.spec)
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, steps=args.steps))
    torch.set_num_threads(spec.train.threads)  # the trainer uses the spec's thread count too
    corpus = spec.data.build(context=spec.train.context, vocab_size=spec.model.vocab_size)
    bare_times, trainer_times, loop_times = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            bare_times.append(bare_loop(spec, corpus))
            seconds, loop_seconds, store = trainer_run(spec, corpus, Path(tmp))
            trainer_times.append(seconds)
            loop_times.append(loop_seconds)
        run = FamilyStore(store).run(spec.model.sizes[0].name, 0)
        n_ckpt = run.n_checkpoints
        params = run.parameters_at(int(run.steps()[0]))
        param_bytes = sum(a.nbytes for a in params.values())
        rng_bytes = run.group["state/rng_state"].shape[1]
        raw_state = 3 * param_bytes + rng_bytes  # weights + two AdamW moments + RNG state
        state_disk = FamilyStore(store).disk_bytes(run.run.path)
        per_step = state_disk - sum(
            FamilyStore(store).disk_bytes(f"{run.run.path}/{name}")
            for name in run.parameter_names + ["state"]
        )
        weights_disk = sum(
            FamilyStore(store).disk_bytes(f"{run.run.path}/{name}") for name in run.parameter_names
        )

    bare, trainer, loop = min(bare_times), min(trainer_times), min(loop_times)
    steps = spec.train.steps
    print(f"model: {spec.model.architecture} {spec.model.sizes[0]}")
    print(f"steps: {steps}, checkpoints written: {n_ckpt} (default schedule of {args.spec})")
    print(f"bare PyTorch loop                : {steps / bare:6.1f} steps/s (best of {args.rounds})")
    print(f"observatory trainer, from step 0 : {steps / loop:6.1f} steps/s (best of {args.rounds})")
    print(
        f"observatory trainer, with set-up : {steps / trainer:6.1f} steps/s (best of {args.rounds})"
    )
    print(
        f"speed ratio trainer/bare, best of each: {bare / loop:.3f} from step 0, "
        f"{bare / trainer:.3f} with set-up"
    )
    # The machine's speed drifts between rounds; each round's bare loop and trainer run back to
    # back, so the median of the per-round ratios is the steadier figure.
    paired = [b / t for b, t in zip(bare_times, loop_times, strict=True)]
    paired_setup = [b / t for b, t in zip(bare_times, trainer_times, strict=True)]
    print(
        f"speed ratio trainer/bare, median of {args.rounds} paired rounds: "
        f"{statistics.median(paired):.3f} from step 0 (target >= 0.95), "
        f"{statistics.median(paired_setup):.3f} with set-up; "
        f"per round: {', '.join(f'{r:.3f}' for r in paired)}"
    )
    print(
        f"weights on disk per checkpoint: {weights_disk / n_ckpt / 1e3:.1f} kB vs raw float32 "
        f"{param_bytes / 1e3:.1f} kB -> ratio {weights_disk / n_ckpt / param_bytes:.3f}"
    )
    full = (state_disk - per_step) / n_ckpt
    print(
        f"full checkpoint (weights + AdamW + RNG) on disk: {full / 1e3:.1f} kB vs raw "
        f"{raw_state / 1e3:.1f} kB -> ratio {full / raw_state:.3f}"
    )
    print(f"per-step records (metrics + batch indices): {per_step / steps:.0f} bytes/step")


if __name__ == "__main__":
    main()
