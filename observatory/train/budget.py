"""Memory and disk checks before training: a spec that cannot fit is refused before it starts.

Estimates are upper bounds computed from the spec alone (models are built on torch's meta
device, so nothing is allocated): a family that would run out of memory or disk hours into
training fails in one line instead, naming what needs the most.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch

from observatory.errors import SpecError
from observatory.models import build_config, model_from_config
from observatory.spec import RunId, RunSpec, SizeSpec
from observatory.store import writer_memory


def check_budget(spec: RunSpec, runs: list[RunId], path: str | Path) -> None:
    """Refuse, before allocating anything, a spec that cannot fit this machine.

    Estimates the memory a run needs (parameters, gradients and AdamW state; the checkpoints
    the writer buffers; the corpus; a batch's activations) against the memory available, and
    the disk its checkpoints and step records take (uncompressed) against the free space.

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
    memory, disk = {}, 0
    for size in {run.size: spec.size(run.size) for run in runs}.values():
        params = _parameter_count(spec, size) * 4
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
        runs_of_size = sum(run.size == size.name for run in runs)
        disk += runs_of_size * (n_ckpt * state + train.steps * (train.batch_size * 8 + 40))
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


def _parameter_count(spec: RunSpec, size: SizeSpec) -> int:
    """Exact parameter count of a size, from models of 1 and 2 layers on torch's meta device."""
    counts = []
    for n_layers in (1, 2):
        with torch.device("meta"):  # shapes only: nothing is allocated
            model = model_from_config(
                build_config(spec.model, dataclasses.replace(size, n_layers=n_layers))
            )
        counts.append(sum(p.numel() for p in model.parameters()))
    return counts[0] + (size.n_layers - 1) * (counts[1] - counts[0])


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
