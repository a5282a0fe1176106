"""Real data on disk: training memory and speed on a memory-mapped token file, tokenizing.

Prints four figures, each against a baseline measured in the same process:

1. peak RSS of ``observatory train`` (a fresh process, a small model, ``--rss-steps`` steps)
   on a token file of ``--tokens-large`` tokens (flat ``uint16``; 1 GB by default) minus on
   one of ``--tokens-small``: the corpus stays on disk, so training memory must not grow with
   it (target <= 64 MiB).  The first run on each file hashes it (streamed, in chunks) into the
   token cache; later runs only reopen it.  Both are printed: the first run once per file,
   the reopening runs as medians of ``--rounds`` alternating fresh processes per side;
2. trainer steps/s on the memory-mapped large file / on the same tokens copied into memory
   (the same spec, seed and steps, the two sides taking turns; median of the rounds' ratios;
   target >= 0.97);
3. the throughput of ``observatory tokenize`` in MB/s of text: the Python standard library's
   ``.py`` files, a byte-level BPE of ``--vocab`` tokens trained first, into a fresh cache;
   the command reports its tokenizing time, the rest of its wall time is training the BPE
   (and the command's start);
4. the cost of reopening the cached large corpus (``build_corpus`` on the already-hashed
   file, as every later ``train``, ``replay``, ``verify`` and analysis does; median of
   rounds; target <= 1 s).

    python benchmarks/bench_data.py [--tokens-large 500_000_000] [--tokens-small 5_000_000]
                                    [--rounds 3] [--keep DIR]

Writes about 2 bytes per token into a temporary folder (removed at the end unless ``--keep``).
Timings on a shared machine are noisy: run it when the machine is otherwise idle.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

from observatory.data import build_corpus
from observatory.spec import load_run_spec
from observatory.store import create_family
from observatory.train import train_run

MIB = 2**20
CHUNK = 1 << 24  # tokens generated and written at a time

SPEC = """\
name = "bench-data"

[model]
architecture = "gpt_neox"
vocab_size = {vocab}

[[model.sizes]]
name = "l2-d64"
n_layers = 2
d_model = 64
n_heads = 4
n_positions = 64

[data]
source = "tokens"
paths = ["{path}"]
dtype = "uint16"
cache = "{cache}"

[seeds]
init = [0]
data = [0]

[train]
steps = {steps}
batch_size = 32
context = 64

[optimizer]
lr = 1e-3
warmup_steps = 10

[checkpoints]
log_spaced = true
every = 10
"""


def write_tokens(path: Path, n_tokens: int, vocab: int, seed: int) -> None:
    """A flat ``uint16`` token file of ``n_tokens`` random ids below ``vocab``, in chunks."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as file:
        for start in range(0, n_tokens, CHUNK):
            count = min(CHUNK, n_tokens - start)
            rng.integers(0, vocab, count, dtype=np.uint16).tofile(file)


def write_spec(path: Path, tokens: Path, cache: Path, steps: int, vocab: int) -> Path:
    path.write_text(SPEC.format(path=tokens, cache=cache, steps=steps, vocab=vocab))
    return path


def train_peak_rss(spec: Path, store: Path) -> int:
    """Peak RSS (bytes) of ``observatory train spec`` in a fresh process."""
    command = [sys.executable, "-m", "observatory.cli", "train", str(spec)]
    command += ["--store", str(store), "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed: {process.stderr.read().decode().strip()}")
    process.stderr.close()
    shutil.rmtree(store)
    return usage.ru_maxrss * 1024


def peak_rss(specs: dict[str, Path], rounds: int, tmp: Path) -> list[str]:
    """Peak RSS of training on each token file: its first run (hashing), then reopening."""
    first = {label: train_peak_rss(spec, tmp / "rss.zarr") for label, spec in specs.items()}
    reopened: dict[str, list[int]] = {label: [] for label in specs}
    for _ in range(rounds):
        for label, spec in specs.items():
            reopened[label].append(train_peak_rss(spec, tmp / "rss.zarr"))
    (large, small) = specs
    median = {label: statistics.median(values) for label, values in reopened.items()}
    added = median[large] - median[small]

    def listed(values):
        return ", ".join(f"{v / MIB:.0f}" for v in values)

    return [
        f"peak RSS of `observatory train`, reopening the cached corpus, {rounds} fresh "
        f"processes each: {large} {listed(reopened[large])} MiB, {small} "
        f"{listed(reopened[small])} MiB -> the large file adds {added / MIB:.1f} MiB "
        "(medians; target <= 64 MiB)",
        f"  first run, hashing the file into the cache: {large} {first[large] / MIB:.0f} MiB, "
        f"{small} {first[small] / MIB:.0f} MiB -> {(first[large] - first[small]) / MIB:.1f} MiB",
    ]


def speed_ratio(spec_path: Path, rounds: int, tmp: Path) -> list[str]:
    """Trainer steps/s on the memory-mapped corpus / on the same tokens in memory."""
    spec = load_run_spec(spec_path)
    mapped = build_corpus(spec.data, context=spec.train.context, vocab_size=spec.model.vocab_size)
    in_memory = dataclasses.replace(mapped, stream=np.array(mapped.stream))
    run = spec.runs()[0]
    seconds: dict[str, list[float]] = {"memory-mapped": [], "in memory": []}
    for index in range(rounds):
        for label, corpus in (("memory-mapped", mapped), ("in memory", in_memory)):
            store = tmp / f"speed-{index}.zarr"
            root = create_family(store, spec, data={"fingerprint": corpus.fingerprint})
            seconds[label].append(train_run(spec, run, root, corpus, progress=False).seconds)
            shutil.rmtree(store)
    del in_memory
    ratios = [m / d for d, m in zip(*seconds.values(), strict=True)]
    steps = spec.train.steps
    return [
        f"trainer steps/s, {steps} steps, memory-mapped / in memory, median of {rounds} "
        f"alternating rounds: {statistics.median(ratios):.3f} (target >= 0.97)",
        "  every round: "
        + ", ".join(
            f"{steps / d:.1f} / {steps / m:.1f} steps/s ({m / d:.3f})"
            for d, m in zip(*seconds.values(), strict=True)
        ),
    ]


def tokenize_throughput(vocab: int, tmp: Path) -> list[str]:
    """MB/s of text of ``observatory tokenize`` on the stdlib's ``.py`` files, fresh cache."""
    spec = tmp / "tokenize.toml"
    # the corpus of runs/text.toml: the standard library without the installed packages
    text = SPEC.format(path="{stdlib}", cache=tmp / "tokenize-cache", steps=1, vocab=vocab)
    text = text.replace(
        'source = "tokens"',
        'source = "text"\nglob = "*.py"\nexclude = ["site-packages/*"]\nerrors = "replace"\n'
        'tokenizer = "bpe"',
    )
    spec.write_text(text.replace('dtype = "uint16"\n', ""))
    command = [sys.executable, "-m", "observatory.cli", "tokenize", str(spec), "--no-progress"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr.strip()}")
    found = re.search(r"(\d+) tokens in (\d+) documents, ([\d.]+) s", done.stdout)
    if found is None:
        raise SystemExit(f"unexpected output of {' '.join(command)}: {done.stdout.strip()}")
    n_tokens, n_documents, seconds = int(found[1]), int(found[2]), float(found[3])
    meta_bytes = _text_bytes(tmp / "tokenize-cache")
    return [
        f"`observatory tokenize` of {n_documents} stdlib .py files ({meta_bytes / 1e6:.1f} MB "
        f"of text, {sysconfig.get_paths()['stdlib']}), BPE of {vocab} tokens, "
        f"{len(os.sched_getaffinity(0))} cores: tokenizing {seconds:.1f} s -> "
        f"{meta_bytes / seconds / 1e6:.2f} MB/s ({n_tokens} tokens, "
        f"{meta_bytes / n_tokens:.2f} bytes/token); whole command {wall:.1f} s -> "
        f"{meta_bytes / wall / 1e6:.2f} MB/s, of which training the BPE and starting "
        f"{wall - seconds:.1f} s",
    ]


def _text_bytes(cache: Path) -> int:
    import json

    (meta,) = cache.glob("tokens/*/meta.json")
    return json.loads(meta.read_text())["text_bytes"]


def reopen_cost(spec_path: Path, rounds: int) -> str:
    """Seconds of ``build_corpus`` on an already-hashed token file, median of rounds."""
    spec = load_run_spec(spec_path)
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        build_corpus(spec.data, context=spec.train.context, vocab_size=spec.model.vocab_size)
        seconds.append(time.perf_counter() - start)
    return (
        f"reopening the cached large corpus (build_corpus), median of {rounds}: "
        f"{statistics.median(seconds) * 1e3:.1f} ms (rounds "
        f"{', '.join(f'{s * 1e3:.1f}' for s in seconds)} ms; target <= 1 s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens-large", type=int, default=500_000_000)
    parser.add_argument("--tokens-small", type=int, default=5_000_000)
    parser.add_argument("--vocab", type=int, default=1024, help="model and BPE vocabulary")
    parser.add_argument("--rss-steps", type=int, default=50, help="steps of each RSS run")
    parser.add_argument("--steps", type=int, default=300, help="steps of each speed round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (fresh processes) per side")
    parser.add_argument(
        "--keep", metavar="DIR", help="keep the token files, specs and cache in DIR"
    )
    args = parser.parse_args()
    print(f"cores available: {len(os.sched_getaffinity(0))}; load: {os.getloadavg()[0]:.1f}")
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="bench-data-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        specs = {}
        for seed, (label, n) in enumerate(
            (("large", args.tokens_large), ("small", args.tokens_small))
        ):
            tokens = tmp / f"{label}.bin"
            start = time.perf_counter()
            write_tokens(tokens, n, args.vocab, seed)
            print(
                f"{label}: {n} tokens, {tokens.stat().st_size / 1e9:.2f} GB "
                f"(written in {time.perf_counter() - start:.1f} s)",
                flush=True,
            )
            specs[f"{label} ({n:_} tokens)"] = write_spec(
                tmp / f"{label}.toml", tokens, tmp / "cache", args.rss_steps, args.vocab
            )
        print("\n".join(peak_rss(specs, args.rounds, tmp)), flush=True)
        large = next(iter(specs.values()))
        speed = write_spec(
            tmp / "speed.toml", tmp / "large.bin", tmp / "cache", args.steps, args.vocab
        )
        print("\n".join(speed_ratio(speed, args.rounds, tmp)), flush=True)
        print(reopen_cost(large, max(args.rounds, 5)), flush=True)
        print("\n".join(tokenize_throughput(args.vocab, tmp)), flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
