"""Deterministic training of a model family, with dense checkpoints in one zarr store.

Reads top to bottom: :func:`train_family` loops over runs (size x seed pair), one after another
or as one task per run on dask.distributed, and :func:`train_run` is the training loop of one
run.  Everything a run does is a function of the spec and its two seeds, so the same spec gives
bit-identical weights on one device type, and a resumed run continues exactly where the
interrupted one stopped.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import platform
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from observatory.analysis.phase import FINAL_LOSS_STEPS, final_loss
from observatory.data import (
    DATA_ORDER_RULE,
    Corpus,
    batch_indices,
    build_corpus,
    data_order_fingerprint,
)
from observatory.errors import ObservatoryError, SpecError, StoreError
from observatory.memory import one_malloc_arena
from observatory.models import (
    build_config,
    build_model,
    model_from_config,
    stack_layers,
    unstack_layers,
)
from observatory.spec import RunId, RunSpec, SizeSpec
from observatory.store import (
    Checkpoint,
    FamilyStore,
    RunLock,
    RunWriter,
    StepRecord,
    create_family,
    location,
    write_size_attrs,
    writer_memory,
)


@dataclass(frozen=True)
class RunSummary:
    """What one call of :func:`train_run` did."""

    run: str  # the run's path in the store, e.g. "l2-d64/seed0"
    steps: int  # training steps taken in this call (0 if the run was already complete)
    checkpoints: int  # checkpoints committed in this call
    seconds: float  # wall time from the first step to the last commit
    writer_seconds: float  # time the writer thread spent storing (overlaps training)
    final_loss: float | None  # analysis.phase.final_loss of the steps taken, if any
    complete: bool  # every scheduled step is trained


def train_family(
    spec: RunSpec,
    *,
    store: str | Path | None = None,
    seeds: list[int] | None = None,
    sizes: list[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    on_run_end: Callable[[RunSummary], None] | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    client=None,
) -> str | Path:
    """Train every run of the family (or the selected seeds/sizes) into one store.

    Runs train one after another in this process, or, with ``workers``, ``scheduler`` or
    ``client``, as one dask.distributed task per run: this process creates the family's
    metadata, and each run is written by the one worker process that trains it.

    Parameters
    ----------
    spec
        The family's run spec.
    store
        Store path or URL (``s3://bucket/family.zarr``); defaults to ``spec.default_store``.
    seeds
        Seed indices to train (default: all).
    sizes
        Size names to train (default: all).
    resume
        Continue unfinished runs from their last committed checkpoint and skip finished ones.
        Without it, a run that already has data in the store is an error.
    progress
        Show a progress bar per run (on a cluster: one bar over the runs).
    stop_after
        Stop every run after this many steps in this call, leaving it unfinished (for tests and
        for splitting long trainings; the run resumes later with ``resume=True``).
    on_run_end
        Called with each run's :class:`RunSummary` when the run stops.
    workers
        Train on a local dask cluster of this many single-threaded worker processes.
    scheduler
        Train on the running dask cluster at this address (``tcp://host:8786``).
    client
        Train on the cluster of this ``distributed.Client`` (one the caller has already).

    Returns
    -------
    pathlib.Path or str
        The store path, or its URL.
    """
    path = location(store or spec.default_store)
    one_malloc_arena()  # before zarr starts its threads
    # Everything that can be checked is checked before the store is touched.
    runs = spec.runs(seeds=seeds, sizes=sizes)
    check_budget(spec, runs, path)
    sequential = workers is None and scheduler is None and client is None
    if sequential:
        spec.train.require_device()  # on a cluster, each worker checks its own
    on_run_end = on_run_end or (lambda summary: None)
    options = {"resume": resume, "stop_after": stop_after}
    # In this process, Ctrl-C stops at a step boundary (see interrupts_between_steps).
    with interrupts_between_steps() if sequential else nullcontext():
        corpus = build_corpus(
            spec.data, context=spec.train.context, vocab_size=spec.model.vocab_size
        )
        root = _create_store(spec, path, runs, corpus)
        if sequential:
            for run in runs:
                raise_if_interrupted()
                on_run_end(train_run(spec, run, root, corpus, progress=progress, **options))
            return path
    if client is not None:
        _train_on_cluster(client, spec, str(path), runs, corpus, progress, on_run_end, options)
    else:
        from observatory.jobs.cluster import dask_client

        threads = spec.train.threads
        with dask_client(scheduler=scheduler, workers=workers or 0, threads=threads) as client:
            _train_on_cluster(client, spec, str(path), runs, corpus, progress, on_run_end, options)
    return path


def _create_store(spec: RunSpec, path, runs: list[RunId], corpus: Corpus):
    """Create the family's store (or open it) with its data record and each size's attributes."""
    root = create_family(
        path,
        spec,
        data={
            "fingerprint": corpus.fingerprint,
            "n_sequences": len(corpus),
            "context": spec.train.context,
            "order_rule": DATA_ORDER_RULE,
        },
    )
    for name in dict.fromkeys(run.size for run in runs):
        size = spec.size(name)
        write_size_attrs(root, size, hf_config=build_config(spec.model, size).to_dict())
    return root


_interrupted = threading.Event()


@contextmanager
def interrupts_between_steps() -> Iterator[None]:
    """Within the block, Ctrl-C (SIGINT) stops training at the next step boundary.

    Python raises KeyboardInterrupt at whatever bytecode runs when the signal arrives. That
    can be a weakref callback or a ``__del__``, where Python prints "Exception ignored" with a
    traceback and carries on, or zarr's bookkeeping half-way through a call. So the handler only
    records the signal, and :func:`raise_if_interrupted` raises it where the loop checks: before
    each step and each run. A second Ctrl-C interrupts at once. Outside the main thread (a dask
    worker) this does nothing: signals reach the main thread only.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def record(signum, frame):
        if _interrupted.is_set():
            raise KeyboardInterrupt
        _interrupted.set()

    previous = signal.signal(signal.SIGINT, record)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _interrupted.clear()


def raise_if_interrupted() -> None:
    """Raise the KeyboardInterrupt that :func:`interrupts_between_steps` held back, if any."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


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
    if spec.data.source == "induction":
        corpus = spec.data.n_sequences * train.context * 8
    else:
        corpus = spec.data.max_bytes * 8 * train.context // (train.context - 1)
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


def _train_on_cluster(client, spec, store, runs, corpus, progress, on_run_end, options) -> None:
    """One task per run; report each run as it ends, and every failed run at the end."""
    from distributed import as_completed

    shared_corpus = client.scatter(corpus, broadcast=True)  # workers need not have the files
    futures = {
        client.submit(
            _train_task,
            spec,
            store,
            run,
            shared_corpus,
            **options,
            key=f"train-{run.path}",
            pure=False,
        ): run
        for run in runs
    }
    failed = []
    with tqdm(total=len(runs), unit="run", desc="train", disable=not progress) as bar:
        for future in as_completed(futures):
            try:
                summary = future.result()
            except ObservatoryError as err:
                failed.append(str(err))
            except Exception as err:  # e.g. KilledWorker: the run is left resumable
                failed.append(f"{futures[future].path}: {type(err).__name__}: {err}")
            else:
                with tqdm.external_write_mode():
                    on_run_end(summary)
            bar.update(1)
    if failed:
        raise StoreError(f"{len(failed)} of {len(runs)} runs failed: {'; '.join(failed)}")


def _train_task(spec, store, run, corpus, *, resume, stop_after) -> RunSummary:
    """Train one run on a dask worker, into the store the client created."""
    root = FamilyStore(store, mode="r+").root
    return train_run(spec, run, root, corpus, resume=resume, progress=False, stop_after=stop_after)


def train_run(
    spec: RunSpec,
    run: RunId,
    root,
    corpus: Corpus,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    on_batch: Callable[[int, torch.Tensor], None] | None = None,
) -> RunSummary:
    """Train one run, writing checkpoints and per-step records through a :class:`RunWriter`.

    ``on_batch(step, tokens)`` is called with every batch the model consumes, before the model
    sees it (tests use it to compare against the recorded data order).

    Returns
    -------
    RunSummary
        Steps, checkpoints and time of this call.
    """
    spec.train.require_device()
    device = _setup_device(spec.train.device)
    one_malloc_arena()
    # One writer per run: a second one gets a one-line error.
    with recipe(spec.train.threads), RunLock(root, run):
        return _train(
            spec,
            run,
            root,
            corpus,
            resume=resume,
            progress=progress,
            stop_after=stop_after,
            on_batch=on_batch,
            device=device,
        )


@contextmanager
def recipe(threads: int) -> Iterator[None]:
    """Run the block under the numerics the recipe fixes: deterministic kernels, ``threads``.

    Determinism: one seed fixes the initial weights; the data order has its own seed and is a
    pure function of the step, so no loader state can drift. The thread count is fixed by the
    spec because CPU reductions round differently with a different split of the work.
    """
    torch.use_deterministic_algorithms(True)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def recipe_record(spec: RunSpec) -> dict[str, str | int]:
    """What, besides the spec and the seeds, decides a run's numbers bit for bit.

    Stored with every run: replay refuses (or, if asked, warns) where the machine it runs on
    differs, since the same floats are only promised for the same kernels and work split.
    """
    return {
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "threads": spec.train.threads,
        "device": spec.train.device,
        # the SIMD kernels torch dispatches to (e.g. AVX2 vs AVX512) round differently
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def _setup_device(device: str) -> dict[str, str]:
    """Make training on ``device`` deterministic; what to record about it with the run.

    Weights are bit-identical from run to run on one device type (CPU with the spec's thread
    count; CUDA with deterministic kernels), not from one device type to another.
    """
    if device == "cpu":
        return {"type": "cpu", "name": platform.processor() or platform.machine()}
    # cuBLAS needs a fixed workspace to reduce deterministically; TF32 would round differently.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    return {
        "type": "cuda",
        "name": torch.cuda.get_device_name(),
        "cuda": str(torch.version.cuda),
        "cudnn": str(torch.backends.cudnn.version()),
    }


def _train(
    spec, run, root, corpus, *, resume, progress, stop_after, on_batch, device
) -> RunSummary:
    size = spec.size(run.size)
    total_steps, batch_size = spec.train.steps, spec.train.batch_size
    tokens_per_step = spec.train.tokens_per_step
    schedule = spec.checkpoints.steps(total_steps)
    keyframes = spec.checkpoints.keyframes(total_steps)
    # Initialised on the CPU, so the initial weights are the same on every device.
    model = build_model(spec.model, size, init_seed=run.init_seed).to(spec.train.device)
    model.train()
    optimizer = spec.optimizer.build(model)
    writer = RunWriter(
        root,
        run,
        spec,
        param_shapes={k: v.shape for k, v in stack_layers(dict(model.named_parameters())).items()},
        d_head=size.d_head,
        schedule=schedule,
        keyframes=keyframes,
        rng_bytes=torch.get_rng_state().numel(),
        recipe=recipe_record(spec),
        data_order_fingerprint=data_order_fingerprint(
            data_seed=run.data_seed, dataset_size=len(corpus)
        ),
    )
    writer.record_device(device)
    n_ckpt, n_steps = writer.committed
    if writer.complete:
        if not resume:
            raise StoreError(f"{run.path} is already trained; use another --store to retrain")
        return RunSummary(
            run=run.path,
            steps=0,
            checkpoints=0,
            seconds=0.0,
            writer_seconds=0.0,
            final_loss=None,
            complete=True,
        )
    if n_ckpt and not resume:
        raise StoreError(
            f"{run.path} already has {n_ckpt} checkpoints in the store; "
            "pass --resume to continue it"
        )

    start = 0
    if n_ckpt:
        # Resume from the last committed keyframe: weights, AdamW moments and RNG state are
        # restored bit for bit, so the continuation equals an uninterrupted run.
        last = writer.last_keyframe()
        start = last.step
        restore(model, optimizer, last)
        n_ckpt = schedule.index(start) + 1
    writer.truncate(n_ckpt, start)  # drop what a crash left past the keyframe; it is redone
    writer.start()

    checkpoint_steps, keyframe_steps = set(schedule), set(keyframes)
    end = total_steps if stop_after is None else min(total_steps, start + stop_after)
    bar = tqdm(
        total=total_steps,
        initial=start,
        desc=run.path,
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
    )
    finished = False
    loss_value, steps_taken = None, 0
    recent = collections.deque(maxlen=FINAL_LOSS_STEPS)  # for the final loss
    started = time.perf_counter()
    try:
        for step in range(start, end + 1):
            raise_if_interrupted()
            if step in checkpoint_steps and not (step == start and n_ckpt):
                state = step in keyframe_steps  # optimizer and RNG state only at keyframes
                writer.put_checkpoint(snapshot(model, optimizer, step, tokens_per_step, state))
            if step == total_steps:
                finished = True
                break
            if step == end:
                break

            indices = batch_indices(
                data_seed=run.data_seed, step=step, batch_size=batch_size, dataset_size=len(corpus)
            )
            tokens = corpus.batch(indices)  # [batch, context]
            if on_batch is not None:
                on_batch(step, tokens)
            tokens = tokens.to(spec.train.device)

            lr = spec.optimizer.lr_at(step, total_steps)
            loss, grad_norm = train_step(
                model, optimizer, tokens, lr=lr, grad_clip=spec.optimizer.grad_clip
            )
            loss_value = loss.item()
            recent.append(loss_value)
            writer.put_step(
                StepRecord(
                    step=step,
                    loss=loss_value,
                    lr=lr,
                    grad_norm=grad_norm.item(),
                    tokens_seen=(step + 1) * tokens_per_step,
                    batch_indices=indices,
                )
            )
            steps_taken += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
    finally:
        # On Ctrl-C or an error, still commit what was buffered: --resume picks up from there.
        try:
            writer.close(complete=finished)
        finally:
            bar.set_postfix(
                loss=f"{loss_value:.3f}" if loss_value is not None else "-",
                checkpoints=writer.checkpoints_written,
                writer=f"{writer.busy_seconds:.1f}s",
            )
            bar.close()
    return RunSummary(
        run=run.path,
        steps=steps_taken,
        checkpoints=writer.checkpoints_written,
        seconds=time.perf_counter() - started,
        writer_seconds=writer.busy_seconds,
        final_loss=final_loss(np.array(recent)) if recent else None,
        complete=finished,
    )


def train_step(
    model,
    optimizer,
    tokens: torch.Tensor,
    *,
    lr: float,
    grad_clip: float,
    before_update: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch: the step of training, and of replay (one function).

    Parameters
    ----------
    model, optimizer
        The model (train mode) and its AdamW optimizer.
    tokens
        ``[batch, context]`` token ids; the model learns to predict each next token.
    lr
        Learning rate of this step (``spec.optimizer.lr_at(step, total_steps)``).
    grad_clip
        Clip the gradient norm to this (0: no clipping).
    before_update
        Called with the loss after the backward pass, while the parameters hold this batch's
        unclipped gradients and the weights that produced them (replay's ``on_step``).

    Returns
    -------
    tuple of torch.Tensor
        The loss and the gradient norm before clipping (0-dim tensors).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    if before_update is not None:
        before_update(loss)
    # clip_grad_norm_ returns the norm before clipping; max_norm=inf only measures it
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # Detached: a loss kept by the caller would otherwise keep the step's autograd graph alive
    # into the next step (measured: 100-250 MiB more peak memory on the 14M-shaped size).
    return loss.detach(), grad_norm


def snapshot(
    model, optimizer, step: int, tokens_per_step: int, state: bool, rng: torch.Tensor | None = None
) -> Checkpoint:
    """Copy the weights (and, if ``state``, AdamW moments and RNG state) for the writer.

    ``rng`` is the RNG state training continues with (default: torch's global one).
    """
    params = dict(model.named_parameters())
    checkpoint = Checkpoint(
        step=step, tokens_seen=step * tokens_per_step, params=stack_layers(params)
    )
    if not state:
        return checkpoint
    moments = {}
    for moment in ("exp_avg", "exp_avg_sq"):
        # Before the first update AdamW has no state yet: the moments are zero.
        moments[moment] = stack_layers(
            {
                name: optimizer.state[p][moment] if p in optimizer.state else torch.zeros_like(p)
                for name, p in params.items()
            }
        )
    rng_state = (torch.get_rng_state() if rng is None else rng).numpy().copy()
    return dataclasses.replace(checkpoint, moments=moments, rng_state=rng_state)


def restore(model, optimizer, checkpoint: Checkpoint) -> None:
    """Load a checkpoint's weights, AdamW state and RNG state into ``model`` and ``optimizer``."""
    params = unstack_layers(checkpoint.params)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    if checkpoint.step > 0:
        moments = {m: unstack_layers(arrays) for m, arrays in checkpoint.moments.items()}
        for name, p in model.named_parameters():
            optimizer.state[p] = {
                # AdamW keeps its step count as a float32 tensor
                "step": torch.tensor(float(checkpoint.step), dtype=torch.float32),
                "exp_avg": moments["exp_avg"][name].to(p.device, copy=True),
                "exp_avg_sq": moments["exp_avg_sq"][name].to(p.device, copy=True),
            }
    torch.set_rng_state(torch.from_numpy(np.array(checkpoint.rng_state, dtype=np.uint8)))
