"""Scaling out: parallel training on dask workers, a Pythia-14M-shaped size, reads from S3.

Prints three figures, each against a baseline measured in the same process:

1. family wall time of ``observatory train`` with ``--workers 2`` vs one process, one torch
   thread per run (the demo spec with ``threads = 1``; each command in a fresh process, as a
   user runs it; target >= 1.7x on 2 cores);
2. for the Pythia-14M-shaped size (``runs/pythia14m.toml``): the trainer-vs-bare-loop speed
   ratio (the lock-step measurement of ``bench_trainer.py``; target >= 0.95), and the peak
   RSS of fresh processes that train it with the trainer against that of ones that run the
   bare loop on the same batches (medians of ``--rss-rounds``): what checkpoints, writer and
   store add must stay within what the writer may hold (``store.writer_memory``: its buffer
   of at most ``checkpoints_per_chunk`` checkpoints and ``MAX_BUFFER_BYTES``, the checkpoint
   in transit to it, and zarr's encoding of one piece);
3. bytes fetched from S3 (a moto server on loopback) to read one head of one layer across all
   checkpoints, vs to read every checkpoint's weights whole.

    python benchmarks/bench_scale.py [--steps 1000] [--runs 4] [--rounds 2] [--big-steps 200]

Timings on a shared machine are noisy: run it when the machine is otherwise idle.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import multiprocessing
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench_trainer import BareLoop, lockstep_round

from observatory.data import batch_indices, build_corpus
from observatory.models import build_model
from observatory.spec import load_run_spec
from observatory.store import ENCODING_COPIES, WRITE_PIECE, buffer_slots, writer_memory
from observatory.train import recipe, train_family


def with_train(spec, **changes):
    return dataclasses.replace(spec, train=dataclasses.replace(spec.train, **changes))


def family_speedup(spec_path: str, steps: int, runs: int, rounds: int, tmp: Path) -> list[str]:
    """Wall time of ``observatory train`` of a family, one process vs ``--workers 2``, each a
    fresh command as a user runs it (imports, corpus, store, cluster start and stop included),
    and where the difference goes: the runs' own training time, and the rest.

    The sides alternate for ``rounds`` rounds and the best wall time of each is compared:
    on this shared machine the same command's training speed drifts by 10-20% over minutes,
    and noise only ever adds time.
    """
    spec_file = tmp / "family.toml"
    text = with_values(Path(spec_path).read_text(), "train", steps=steps, threads=1)
    spec_file.write_text(with_values(text, "seeds", init=list(range(runs)), data=list(range(runs))))
    sides = {"one process": [], "--workers 2": ["--workers", "2"]}
    timed: dict[str, list[tuple[float, list[float]]]] = {label: [] for label in sides}
    for index in range(rounds):
        for side, (label, extra) in enumerate(sides.items()):
            store = tmp / f"family-{index}-{side}.zarr"
            timed[label].append(train_command(spec_file, runs, store, extra))
    best = {label: min(results) for label, results in timed.items()}
    (sequential, _), (parallel, _) = best.values()
    lines = [
        f"family of {runs} runs x {steps} steps, 1 torch thread per run, `observatory train` "
        f"in a fresh process, best of {rounds} alternating rounds: one process "
        f"{sequential:.1f} s, --workers 2 {parallel:.1f} s -> speed-up "
        f"{sequential / parallel:.2f}x (target >= 1.7x on 2 cores)",
        "  every round (one process / --workers 2): "
        + ", ".join(
            f"{one[0]:.1f} / {two[0]:.1f} s ({one[0] / two[0]:.2f}x)"
            for one, two in zip(*timed.values(), strict=True)
        ),
    ]
    for label, (wall, seconds) in best.items():
        busy = sum(seconds) / (1 if label == "one process" else 2)  # training per process
        lines.append(
            f"  {label} (best round): each run {', '.join(f'{t:.1f}' for t in seconds)} s "
            f"({steps / (sum(seconds) / len(seconds)):.1f} steps/s); the rest "
            f"{wall - busy:.1f} s"
        )
    return lines


def train_command(spec_file: Path, runs: int, store: Path, extra: list[str]):
    """Wall seconds of one ``observatory train`` command, and each run's training seconds."""
    command = [sys.executable, "-m", "observatory.cli", "train", str(spec_file)]
    command += ["--seeds", f"0-{runs - 1}", "--store", str(store), "--no-progress", *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr.strip()}")
    wall = time.perf_counter() - start
    return wall, [float(t) for t in re.findall(r" steps in ([\d.]+) s", done.stdout)]


def with_values(toml: str, table: str, **values: object) -> str:
    """A spec file's text with ``values`` (ints, lists of ints) set in its ``[table]``."""
    lines, current = toml.splitlines(), None
    for i, line in enumerate(lines):
        if line.startswith("["):
            current = line.strip()
        key = line.split("=")[0].strip()
        if current == f"[{table}]" and key in values:
            lines[i] = f"{key} = {values.pop(key)}"
    at = lines.index(f"[{table}]") + 1
    lines[at:at] = [f"{key} = {value}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def big_model_round(spec_path: str, steps: int, store: str) -> tuple[float, float]:
    """In a fresh process: seconds of the bare loop and of the trainer, in lock-step."""
    spec = with_train(load_run_spec(spec_path), steps=steps)
    corpus = build_corpus(spec.data, context=spec.train.context, vocab_size=spec.model.vocab_size)
    return lockstep_round(spec, corpus, Path(store))


def peak_rss_round(spec_path: str, steps: int, store: str | None) -> int:
    """In a fresh process: peak RSS (bytes) of training one run with the trainer into
    ``store``, or (``store`` None) with the bare loop alone on the same batches."""
    spec = with_train(load_run_spec(spec_path), steps=steps)
    run = spec.runs()[0]
    if store is not None:  # as `observatory train` does
        train_family(spec, store=Path(store), seeds=[run.seed], sizes=[run.size], progress=False)
    else:
        corpus = build_corpus(
            spec.data, context=spec.train.context, vocab_size=spec.model.vocab_size
        )
        bare = BareLoop(spec, run)
        with recipe(spec.train.threads):
            for step in range(steps):
                indices = batch_indices(
                    data_seed=run.data_seed,
                    step=step,
                    batch_size=spec.train.batch_size,
                    dataset_size=len(corpus),
                )
                bare(step, corpus.batch(indices))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def writer_bound(spec_path: str, steps: int) -> tuple[int, int, int]:
    """For a run of ``steps``: the checkpoints the writer buffers, the bytes of one (weights and
    AdamW moments), and the most the writer holds (:func:`observatory.store.writer_memory`)."""
    spec = with_train(load_run_spec(spec_path), steps=steps)
    model = build_model(spec.model, spec.model.sizes[0], init_seed=0)
    checkpoint = 3 * 4 * sum(p.numel() for p in model.parameters())  # float32
    n_checkpoints = len(spec.checkpoints.steps(steps))
    per_chunk = spec.store.checkpoints_per_chunk
    slots = buffer_slots(n_checkpoints, per_chunk, checkpoint)
    return slots, checkpoint, writer_memory(n_checkpoints, per_chunk, checkpoint)


def in_fresh_process(function, *args):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def big_model(spec_path: str, steps: int, rounds: int, tmp: Path) -> list[str]:
    # Peak RSS of identical processes differs by up to 50 MiB here (the heap's layout at the
    # backward pass's peak): medians of alternating rounds.
    peaks: dict[str, list[int]] = {"bare": [], "trainer": []}
    for i in range(rounds):
        peaks["bare"].append(in_fresh_process(peak_rss_round, spec_path, steps, None))
        store = str(tmp / f"big-rss{i}.zarr")
        peaks["trainer"].append(in_fresh_process(peak_rss_round, spec_path, steps, store))
    bare, trainer = in_fresh_process(big_model_round, spec_path, steps, str(tmp / "big.zarr"))
    slots, checkpoint, bound = writer_bound(spec_path, steps)
    median = {label: statistics.median(values) for label, values in peaks.items()}
    added = median["trainer"] - median["bare"]
    mib = 2**20

    def listed(values):
        return ", ".join(f"{v / mib:.0f}" for v in values)

    return [
        f"{spec_path}, {steps} steps: bare loop {steps / bare:.2f} steps/s, trainer "
        f"{steps / trainer:.2f} steps/s -> ratio {bare / trainer:.3f} (target >= 0.95)",
        f"bound (as trainer.check_budget reserves): the writer's buffer of {slots} checkpoints "
        f"and the one in transit, {slots + 1} x {checkpoint / mib:.1f} MiB, and zarr's encoding "
        f"of one piece, {ENCODING_COPIES} x {WRITE_PIECE / mib:.0f} MiB = {bound / mib:.0f} MiB",
        f"peak RSS, {rounds} fresh processes each: trainer {listed(peaks['trainer'])} MiB, "
        f"bare loop {listed(peaks['bare'])} MiB (same model and batches, no store) -> "
        f"checkpoints, writer and store add {added / mib:.0f} MiB (medians; "
        f"{'within' if added <= bound else 'OVER'} the bound)",
    ]


def s3_bytes(spec_path: str, steps: int, tmp: Path) -> str:
    """Bytes fetched from S3 for one head across all checkpoints vs every checkpoint whole."""
    import fsspec
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from observatory.query import head_weights
    from observatory.store import FamilyStore

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = f"http://{host}:{port}"
    fetched = [0]
    original = s3fs.S3FileSystem._cat_file

    async def counting(self, path, *args, **kwargs):
        data = await original(self, path, *args, **kwargs)
        fetched[0] += len(data)
        return data

    try:
        spec = with_train(load_run_spec(spec_path), steps=steps)
        local = train_family(spec, store=tmp / "s3-source.zarr", seeds=[0], progress=False)
        fs = fsspec.filesystem("s3")
        fs.mkdir("bench")
        fs.put(str(local), "bench/family.zarr", recursive=True)
        url = "s3://bench/family.zarr"
        s3fs.S3FileSystem._cat_file = counting
        size = spec.model.sizes[0]
        head_weights(url, size=size.name, seed=0, layer=size.n_layers - 1, head=0)
        one_head = fetched[0]
        fetched[0] = 0
        run = FamilyStore(url).run(size.name, 0)
        run.parameters_for([int(step) for step in run.steps()])  # each array read once
        whole = fetched[0]
        n = run.n_checkpoints
    finally:
        s3fs.S3FileSystem._cat_file = original
        server.stop()
    return (
        f"S3, {n} checkpoints of {size.name}: W_Q of one head of one layer {one_head / 1e3:.1f} "
        f"kB fetched vs every checkpoint's weights {whole / 1e3:.1f} kB -> "
        f"{whole / max(one_head, 1):.0f}x fewer bytes (1 head of {size.n_heads} x "
        f"{size.n_layers} layers; {math.prod((size.n_heads, size.n_layers))} heads in all)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="runs/induction.toml")
    parser.add_argument(
        "--steps", type=int, default=1000, help="steps per run of the family (the demo's 1000)"
    )
    parser.add_argument(
        "--runs", type=int, default=4, help="runs in the family (4: two per worker)"
    )
    parser.add_argument("--big-spec", default="runs/pythia14m.toml")
    parser.add_argument(
        "--big-steps",
        type=int,
        default=200,
        help="steps of the 14M-shaped size (200: the writer's buffer fills and commits)",
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternating rounds per side of the family timing"
    )
    parser.add_argument(
        "--rss-rounds", type=int, default=5, help="fresh processes per side for peak RSS"
    )
    args = parser.parse_args()
    print(f"cores available: {len(os.sched_getaffinity(0))}; load: {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        lines = family_speedup(args.spec, args.steps, args.runs, args.rounds, Path(tmp))
        print("\n".join(lines), flush=True)
        lines = big_model(args.big_spec, args.big_steps, args.rss_rounds, Path(tmp))
        print("\n".join(lines), flush=True)
        print(s3_bytes(args.spec, args.steps, Path(tmp)), flush=True)


if __name__ == "__main__":
    main()
