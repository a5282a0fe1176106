"""Reading one head's W_Q across every checkpoint of a run: observatory vs safetensors files.

The same checkpoints (a GPT-NeoX model whose weights random-walk from their initialisation)
are written twice: (a) as one run of an observatory store, through the store's own writer
(with zero AdamW moments, which take no space, so both formats hold just the weights), and
(b) the Hugging Face / Pythia way, one safetensors file of the state dict per checkpoint.
Then ``W_Q`` of one head (layer 1, head 2) at every checkpoint is read by

(i)   ``safetensors.torch.load_file`` of each file, then slicing.  Since safetensors 0.8 its
      default backend memory-maps the file and only the pages touched are read, so this is
      also timed as
(i')  a full load that reads every byte: ``safetensors.torch.load(path.read_bytes())``,
(ii)  ``safe_open(...).get_slice(name)[rows]`` on each file (reads only the head's rows),
(iii) observatory, lazy xarray path: ``obs.open_run(...)["W_Q"].sel(layer=1, head=2).values``
      (the view's selection is one region read of the stored fused QKV weight), and
(iii') the same through ``obs.open_family(...)`` (the path the README leads with) and
(iii'') through the tree of ``obs.open(...)``,
(iv)  observatory, direct path: ``obs.head_weights(..., layer=1, head=2)``.

Every observatory time includes opening the store.  Rounds alternate between the methods and
the best time of each is kept (the first round is printed too: later rounds reuse the opened
metadata of the unchanged store, as reopening does in any process), with a warm page cache
(dropping the OS caches needs root).  Bytes read: the file sizes for (i'), the mapped file
sizes for (i) (of which only the touched pages are read), the file headers plus the head's
rows for (ii), and for (iii), (iv) every buffer that zarr reads from the store, metadata
included.

    python benchmarks/bench_query.py [--quick] [--rounds 5] [--d-model 256 --n-heads 8 ...]
"""

from __future__ import annotations

import argparse
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr.storage
from safetensors import safe_open
from safetensors.torch import load, load_file, save_file

import observatory as obs
from observatory.models import build_config, build_model, layer_name, stack_layers, unstack_layers
from observatory.spec import RunSpec, spec_from_dict
from observatory.store import (
    MOMENTS,
    Checkpoint,
    RunWriter,
    create_family,
    write_size_attrs,
)

QKV = "gpt_neox.layers.attention.query_key_value.weight"
LAYER, HEAD = 1, 2
# About 0.95 GB on disk for both formats together, built in well under a minute.
DEFAULT_SHAPE = {"n_layers": 4, "d_model": 128, "n_heads": 4, "vocab": 512, "checkpoints": 128}
QUICK_SHAPE = {"n_layers": 2, "d_model": 64, "n_heads": 4, "vocab": 128, "checkpoints": 32}


def bench_spec(
    *, n_layers: int, d_model: int, n_heads: int, vocab: int, checkpoints: int
) -> RunSpec:
    """A one-run GPT-NeoX family with ``checkpoints`` checkpoints, every 10 steps."""
    return spec_from_dict(
        {
            "name": "bench",
            "model": {
                "architecture": "gpt_neox",
                "vocab_size": vocab,
                "sizes": [
                    {
                        "name": "bench",
                        "n_layers": n_layers,
                        "d_model": d_model,
                        "n_heads": n_heads,
                        "n_positions": 64,
                    }
                ],
            },
            "data": {"source": "induction", "n_sequences": 1},
            "seeds": {"init": [0]},
            "train": {"steps": 10 * (checkpoints - 1), "batch_size": 1, "context": 64},
            "checkpoints": {"log_spaced": False, "every": 10},
            "store": {"commit_seconds": 1e9},  # commit whole chunks only, as in a long run
        }
    )


def build(spec: RunSpec, directory: Path) -> tuple[Path, list[Path]]:
    """Write the same checkpoints as an observatory store and as safetensors files."""
    size, run = spec.model.sizes[0], spec.runs()[0]
    params = stack_layers(dict(build_model(spec.model, size, init_seed=0).named_parameters()))
    store = directory / "bench.zarr"
    root = create_family(store, spec, data={"fingerprint": "bench"})
    write_size_attrs(root, size, hf_config=build_config(spec.model, size).to_dict())
    schedule = spec.checkpoints.steps(spec.train.steps)
    writer = RunWriter(
        root,
        run,
        spec,
        param_shapes={name: array.shape for name, array in params.items()},
        d_head=size.d_head,
        schedule=schedule,
        rng_bytes=16,
        data_order_fingerprint="bench",
    )
    zeros = {name: np.zeros_like(array) for name, array in params.items()}
    rng = np.random.default_rng(0)
    files = []
    writer.start()
    for step in schedule:
        for array in params.values():
            array += rng.standard_normal(array.shape, dtype=np.float32) * 1e-3
        snapshot = {name: array.copy() for name, array in params.items()}
        writer.put_checkpoint(
            Checkpoint(
                step=step,
                tokens_seen=step * spec.train.batch_size * spec.train.context,
                params=snapshot,
                moments={moment: zeros for moment in MOMENTS},
                rng_state=np.zeros(16, dtype=np.uint8),
            )
        )
        files.append(directory / f"step{step:06d}.safetensors")
        save_file(unstack_layers(snapshot), files[-1])
    writer.close(complete=True)
    return store, files


def head_rows(d_head: int) -> slice:
    """Rows of the fused query_key_value weight holding head ``HEAD``'s queries."""
    start = HEAD * 3 * d_head  # rows are [head, (q, k, v), d_head]
    return slice(start, start + d_head)


def read_mapped(files: list[Path], rows: slice) -> np.ndarray:
    name = layer_name(QKV, LAYER)
    return np.stack([load_file(f)[name][rows].numpy().T for f in files])


def read_full(files: list[Path], rows: slice) -> np.ndarray:
    name = layer_name(QKV, LAYER)
    return np.stack([load(f.read_bytes())[name][rows].numpy().T for f in files])


def read_slices(files: list[Path], rows: slice) -> np.ndarray:
    name = layer_name(QKV, LAYER)
    out = []
    for f in files:
        with safe_open(f, framework="pt") as tensors:
            out.append(tensors.get_slice(name)[rows].numpy().T)
    return np.stack(out)


def read_xarray(store: Path) -> np.ndarray:
    ds = obs.open_run(store, size="bench", seed=0)
    return ds["W_Q"].sel(layer=LAYER, head=HEAD).values


def read_family(store: Path) -> np.ndarray:
    ds = obs.open_family(store, size="bench")
    return ds["W_Q"].sel(seed=0, layer=LAYER, head=HEAD).values


def read_tree(store: Path) -> np.ndarray:
    return obs.open(store)["bench/seed0"]["W_Q"].sel(layer=LAYER, head=HEAD).values


def read_direct(store: Path) -> np.ndarray:
    return obs.head_weights(store, size="bench", seed=0, layer=LAYER, head=HEAD).values


def best_times(
    rounds: int, methods: dict[str, Callable[[], np.ndarray]]
) -> tuple[dict[str, float], dict[str, float], dict[str, np.ndarray]]:
    """Best wall and CPU seconds (this process, all threads) and the result of each method,
    over rounds that alternate the methods.  On a busy machine the CPU time is the steadier."""
    times: dict[str, list[float]] = {label: [] for label in methods}
    cpu: dict[str, list[float]] = {label: [] for label in methods}
    results = {}
    for _ in range(rounds):
        for label, read in methods.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            results[label] = read()
            times[label].append(time.perf_counter() - start)
            cpu[label].append(time.process_time() - start_cpu)
    best = {label: min(t) for label, t in times.items()}
    print("first round (the store's metadata not yet opened in this process):")
    for label, t in times.items():
        print(f"  {label:45s} {t[0] * 1e3:8.1f} ms")
    return best, {label: min(t) for label, t in cpu.items()}, results


def store_bytes_read(read: Callable[[], np.ndarray]) -> int:
    """Bytes of every buffer that zarr's LocalStore returns while ``read`` runs."""
    local = zarr.storage.LocalStore
    total = 0
    get, get_partial = local.get, local.get_partial_values

    async def counting_get(self, key, prototype=None, byte_range=None):
        nonlocal total
        buffer = await get(self, key, prototype, byte_range)
        total += 0 if buffer is None else len(buffer)
        return buffer

    async def counting_get_partial(self, prototype, key_ranges):
        nonlocal total
        buffers = await get_partial(self, prototype, key_ranges)
        total += sum(len(b) for b in buffers if b is not None)
        return buffers

    local.get, local.get_partial_values = counting_get, counting_get_partial
    try:
        read()
    finally:
        local.get, local.get_partial_values = get, get_partial
    return total


def slice_bytes_read(files: list[Path], rows: slice, d_model: int) -> int:
    """Header (8-byte length + JSON) plus the head's rows, per file."""
    header = 0
    for f in files:
        with f.open("rb") as stream:
            header += 8 + struct.unpack("<Q", stream.read(8))[0]
    return header + len(files) * (rows.stop - rows.start) * d_model * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: a tiny model, 32 checkpoints (too small for meaningful ratios)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (best kept)")
    for key, value in DEFAULT_SHAPE.items():
        parser.add_argument(
            f"--{key.replace('_', '-')}",
            type=int,
            help=f"default {value} (--quick: {QUICK_SHAPE[key]})",
        )
    args = parser.parse_args()
    shape = QUICK_SHAPE if args.quick else DEFAULT_SHAPE
    spec = bench_spec(**{key: getattr(args, key) or value for key, value in shape.items()})
    size = spec.model.sizes[0]
    rows = head_rows(size.d_head)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        store, files = build(spec, Path(tmp))
        built = time.perf_counter() - start
        file_bytes = sum(f.stat().st_size for f in files)
        store_disk = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        methods = {
            "(i)   safetensors load_file (mmap) + slice": lambda: read_mapped(files, rows),
            "(i')  safetensors full load + slice": lambda: read_full(files, rows),
            "(ii)  safetensors safe_open.get_slice": lambda: read_slices(files, rows),
            "(iii) observatory open_run + W_Q.sel": lambda: read_xarray(store),
            "(iii') observatory open_family + W_Q.sel": lambda: read_family(store),
            "(iii'') observatory open (tree) + W_Q.sel": lambda: read_tree(store),
            "(iv)  observatory head_weights": lambda: read_direct(store),
        }
        seconds, cpu_seconds, results = best_times(args.rounds, methods)
        first = next(iter(results.values()))
        assert all(np.array_equal(first, result) for result in results.values())
        read_bytes = [
            file_bytes,
            file_bytes,
            slice_bytes_read(files, rows, size.d_model),
            store_bytes_read(lambda: read_xarray(store)),
            store_bytes_read(lambda: read_family(store)),
            store_bytes_read(lambda: read_tree(store)),
            store_bytes_read(lambda: read_direct(store)),
        ]

    print(
        f"model: gpt_neox {size.n_layers} layers, d_model {size.d_model}, {size.n_heads} heads "
        f"(d_head {size.d_head}), vocab {spec.model.vocab_size}; {len(files)} checkpoints"
    )
    print(
        f"built in {built:.1f} s: safetensors {file_bytes / 1e6:.1f} MB "
        f"({file_bytes / len(files) / 1e6:.2f} MB per file), observatory store "
        f"{store_disk / 1e6:.1f} MB"
    )
    print(
        f"read W_Q[layer {LAYER}, head {HEAD}] at all {len(files)} checkpoints -> "
        f"{first.shape}, best of {args.rounds} alternating rounds, warm page cache:"
    )
    for (label, t), n_bytes in zip(seconds.items(), read_bytes, strict=True):
        note = "  (mapped; only touched pages are read)" if label.startswith("(i) ") else ""
        print(
            f"  {label:45s} {t * 1e3:8.1f} ms  (CPU {cpu_seconds[label] * 1e3:7.1f} ms)  "
            f"{n_bytes / 1e6:9.3f} MB read{note}"
        )
    for clock, best in (("wall", seconds), ("CPU", cpu_seconds)):
        mapped, full, sliced, lazy, family, tree, direct = best.values()
        print(f"speed-ups by {clock} time (targets for (iii): >= 20x full load, >= 1x get_slice):")
        for label, t in (
            ("(iii) lazy open_run + sel", lazy),
            ("(iii') lazy open_family + sel", family),
            ("(iii'') lazy open (tree) + sel", tree),
            ("(iv)  head_weights", direct),
        ):
            print(
                f"  {label:30s} vs full load {full / t:5.1f}x, vs get_slice {sliced / t:4.2f}x, "
                f"vs load_file {mapped / t:5.1f}x"
            )
        print(f"  lazy path / head_weights: {lazy / direct:.2f}")


if __name__ == "__main__":
    main()
