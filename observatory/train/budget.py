"""Memory and disk checks before training: a spec that cannot fit is refused before it starts.

Estimates are upper bounds computed from the spec alone (models are built on torch's meta
device, so nothing is allocated): a family that would run out of memory or disk hours into
training fails in one line instead, naming what needs the most.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import torch

from observatory.errors import SpecError
from observatory.models import build_config, model_from_config, stacked_name
from observatory.spec import RunId, RunSpec, SizeSpec
from observatory.store import FILE_BLOCK, disk_bound, writer_memory
from observatory.train.step import recipe_record


def check_budget(spec: RunSpec, runs: list[RunId], path: str | Path) -> None:
    """Refuse, before allocating anything, a spec that cannot fit this machine.

    Estimates the memory a run needs (parameters, gradients and AdamW state; the checkpoints
    the writer buffers; the corpus; a batch's activations) against the memory available, and
    the disk the runs take (:func:`disk_estimate`) against the free space.

    Raises
    ------
    SpecError
        Naming the largest need, e.g. ``needs ~192.0 TB of memory for the parameters,
        gradients and AdamW state of size 'x'; this machine has 24.0 GB available``.
    """
    train = spec.train
    n_ckpt = _schedule_length(spec)
    # Text and token files stay on disk, memory-mapped; only the synthetic corpus is in memory.
    corpus = spec.data.n_sequences * train.context * 8 if spec.data.source == "induction" else 0
    memory = {}
    for size in {run.size: spec.size(run.size) for run in runs}.values():
        params = sum(map(math.prod, _parameter_shapes(spec, size).values())) * 4
        state = 3 * params  # weights and the two AdamW moments, as one checkpoint holds them
        activations = (
            train.batch_size
            * train.context
            * 4
            * (
                16 * size.d_model * size.n_layers
                + 3 * size.n_heads * train.context * size.n_layers
                + 4 * spec.model.vocab_size
            )
        )
        memory[f"the parameters, gradients and AdamW state of size {size.name!r}"] = 4 * params
        memory[f"the checkpoints the writer buffers for size {size.name!r}"] = writer_memory(
            n_ckpt, spec.store.checkpoints_per_chunk, state
        )
        memory[f"the activations of a batch of size {size.name!r}"] = activations
    memory["the corpus"] = corpus
    memory["the checkpoint schedule"] = n_ckpt * 100
    largest = max(memory, key=memory.get)
    available = _available_memory()
    if sum(memory.values()) > available:
        raise SpecError(
            f"needs ~{_human(sum(memory.values()))} of memory, ~{_human(memory[largest])} of it "
            f"for {largest}; this machine has {_human(available)} available"
        )
    if not isinstance(path, Path):  # an object store: no free space to ask for
        return
    free = shutil.disk_usage(_existing_parent(path)).free
    disk = disk_estimate(spec, runs)
    if disk > free:
        raise SpecError(
            f"needs up to ~{_human(disk)} on disk for {len(runs)} run(s) of {n_ckpt} "
            f"checkpoints and {train.steps} steps; {_existing_parent(path)} has {_human(free)} free"
        )


def _schedule_length(spec: RunSpec) -> int:
    """An upper bound on the number of checkpoints, without listing them."""
    steps, checkpoints = spec.train.steps, spec.checkpoints
    if checkpoints.every_step:
        return steps + 1
    count = 2 + len(checkpoints.extra) + steps.bit_length() * checkpoints.log_spaced
    return count + (steps // checkpoints.every + 1 if checkpoints.every else 0)


def disk_estimate(spec: RunSpec, runs: list[RunId]) -> int:
    """An upper bound on the bytes the finished ``runs`` take on a local disk.

    Each run is bounded from its layout by :func:`~observatory.store.disk_bound` (every chunk
    whole and uncompressed, metadata, file system blocks); the family's and each size's
    metadata documents (the spec, the corpus record, the model config) are bounded by twice
    their compact JSON (for the indentation) plus a block.
    """
    layout = {
        "schedule": spec.checkpoints.steps(spec.train.steps),
        "keyframes": spec.checkpoints.keyframes(spec.train.steps),
        "rng_bytes": torch.get_rng_state().numel(),
        "recipe": recipe_record(spec),
    }
    sizes = {run.size: spec.size(run.size) for run in runs}
    shapes = {name: _parameter_shapes(spec, size) for name, size in sizes.items()}
    total = _document_bound(spec.to_dict())
    for size in sizes.values():
        total += _document_bound(build_config(spec.model, size).to_dict() | size.__dict__)
    for run in runs:
        total += disk_bound(
            spec, run, param_shapes=shapes[run.size], d_head=sizes[run.size].d_head, **layout
        )
    return total


def _document_bound(attrs: dict) -> int:
    return 2 * len(json.dumps(attrs, default=str)) + 2 * FILE_BLOCK


def _parameter_shapes(spec: RunSpec, size: SizeSpec) -> dict[str, tuple[int, ...]]:
    """The stored (per-layer ones stacked) parameter shapes of a size, from a 1-layer model on
    torch's meta device: nothing is allocated, however large the size."""
    with torch.device("meta"):
        model = model_from_config(build_config(spec.model, dataclasses.replace(size, n_layers=1)))
    shapes = {}
    for name, parameter in model.named_parameters():
        stacked, layer = stacked_name(name)
        shape = tuple(parameter.shape)
        shapes[stacked] = shape if layer is None else (size.n_layers, *shape)
    return shapes


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable
