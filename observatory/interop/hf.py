"""Hugging Face interop: export checkpoints as per-step folders, ingest such folders as a store.

Export writes the layout of published suites (Pythia, PolyPythias): one Hugging Face folder per
checkpoint, ``step{N}/config.json`` + ``model.safetensors``, and beside them the provenance of
the run: ``observatory.json`` (spec, seeds, corpus fingerprint, library versions),
``data_order.csv`` (the corpus index of every sequence of every training step up to the last
exported checkpoint) and ``metrics.csv`` (loss, learning rate, gradient norm per step).  A
branch is exported as a run: its checkpoints, metrics and data order are its parent's before
the fork (read through the parent, as every reader does) and its own after, and
``observatory.json`` holds its provenance (parent, fork step, intervention and its SHA-256, and
the chain of branches up to the run for a branch of a branch).  A text
family's step folders also hold its tokenizer (``tokenizer.json`` and ``tokenizer_config.json``,
as ``save_pretrained`` writes them), so ``AutoTokenizer.from_pretrained(step_folder)`` loads it.

Ingest reads directories of checkpoint folders (``step{N}``, ``checkpoint-{N}``, or a mapping
file) of GPT-NeoX or attention-only models into a new store with the usual layout, so every
query, analysis and report works on it.  Each directory is one run; several are seeds of one
family.  An ingested run has weights (and, from an export, its metrics) but no optimizer state
or data order: it is marked so, and what needs them refuses with one line.  An ingested
branch's export is a run of the new store whose ``origin`` keeps the branch's provenance.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from observatory.errors import ObservatoryError
from observatory.spec import RunId, RunSpec, parse_run_path, spec_from_dict

PROVENANCE = "observatory.json"
DATA_ORDER = "data_order.csv"
METRICS = "metrics.csv"
EXPORT_FORMAT = {"format": "observatory-export", "version": 1}
STEP_FOLDER = re.compile(r"(?:step|checkpoint-)(\d+)")
# Config entries that differ between saves of the same model (left out of the config hash).
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "dtype", "torch_dtype")
EXPORT_BLOCK = 16  # checkpoints read together while exporting
# Names that a store path can hold as one folder, on every file system and object store.
NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
# Tensor dtypes that float32 holds exactly: an ingested checkpoint keeps its values bit for bit.
EXACT_DTYPES = ("F16", "BF16", "F32")
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# Options taken from an export's own provenance: giving them is refused rather than ignored.
EXPORT_KEEPS = {
    "name": "--name",
    "size": "--size",
    "context": "--context",
    "batch_size": "--batch-size",
}


class InteropError(ObservatoryError):
    """A checkpoint directory, mapping file or export target that cannot be used."""


def config_hash(config: Any) -> str:
    """A short hash of a Hugging Face config, ignoring what differs between saves."""
    entries = {k: v for k, v in config.to_dict().items() if k not in VOLATILE_CONFIG_KEYS}
    text = json.dumps(entries, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Export.


def export(
    store: str | Path,
    out: str | Path,
    *,
    size: str | None = None,
    seeds: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    per_seed_folders: bool = True,
    run: str | None = None,
) -> list[Path]:
    """Export runs (or a branch) of a store as per-step Hugging Face folders with their
    provenance.

    Parameters
    ----------
    store
        The family store.
    out
        Target directory.  Each run goes to ``out/seed{k}/`` (or straight into ``out`` when
        ``per_seed_folders`` is false, for a single run), which must not exist or be empty.
    size
        Size name; may be omitted when the store has a single size.
    seeds
        Seed indices (default: every run of the size).
    steps
        Checkpoint steps to export (default: every committed one); each must be committed.
    per_seed_folders
        Put each run in its own ``seed{k}`` folder.
    run
        Export this one run or branch, by its path in the store (``"l2-d64/seed0"``,
        ``"l2-d64/seed0/branches/no-prev"``), straight into ``out``; instead of ``size`` and
        ``seeds``.

    Returns
    -------
    list of pathlib.Path
        The run directories written, each with ``step{N}/`` (``config.json``,
        ``model.safetensors`` and, for a family with a tokenizer, the tokenizer files),
        ``observatory.json``, ``metrics.csv`` and, for a trained run, ``data_order.csv``.

    Raises
    ------
    ObservatoryError
        On an unknown size, seed, branch or step, or a target directory that is not empty.
    """
    readers = _readers(store, size, seeds, run)
    if run is None and not per_seed_folders and len(readers) != 1:
        raise InteropError(f"{len(readers)} runs to export: give one seed, or use seed folders")
    out = Path(out)
    own = per_seed_folders and run is None
    targets = [out / f"seed{r.run.seed}" if own else out for r in readers]
    for target in targets:
        if target.exists() and any(target.iterdir()):
            raise InteropError(f"{target}: already exists and is not empty; choose another --out")
    for reader, target in zip(readers, targets, strict=True):
        chosen = list(reader.steps()) if steps is None else list(steps)
        for step in chosen:
            reader.checkpoint_index(step)  # a clear error for a step that is not committed
        _export_run(reader, target, sorted(set(int(s) for s in chosen)))
    return targets


def _readers(store, size: str | None, seeds, run: str | None) -> list:
    """The readers of the runs to export: ``run`` (a run or branch), or the selected seeds."""
    from observatory.jobs.selection import select_readers
    from observatory.query import resolve_size
    from observatory.store import FamilyStore

    family = FamilyStore(store)
    if run is None:
        return select_readers(family, sizes=[resolve_size(family, size)], seeds=seeds)
    if size is not None or seeds is not None:
        raise InteropError(f"--run {run} names the run: leave out --size and --seed(s)")
    size, seed, branch = parse_run_path(run)
    return [family.run(size, seed, branch)]


def _export_run(reader, target: Path, steps: list[int]) -> None:
    """Write one run's checkpoint folders, then its provenance files."""
    from observatory.query import models_at

    family, run = reader.family, reader.run
    text = _text_tokenizer(family)
    with _no_hf_progress_bars():
        for start in range(0, len(steps), EXPORT_BLOCK):
            block = steps[start : start + EXPORT_BLOCK]
            models = models_at(
                family.path, size=run.size, seed=run.seed, steps=block, branch=run.branch
            )
            for step, model in models:
                model.save_pretrained(target / f"step{step}")
                if text is not None:  # AutoTokenizer.from_pretrained(step folder) finds it
                    text.save_pretrained(target / f"step{step}")
                hashed = config_hash(model.config)
    n_steps = min(max(steps), reader.n_steps)  # the training steps behind the last checkpoint
    metrics = reader.metrics()
    _write_csv(
        target / METRICS,
        ["train_step", "loss", "lr", "grad_norm", "train_tokens"],
        zip(
            *(
                metrics[k][:n_steps].tolist()
                for k in ("train_step", "loss", "lr", "grad_norm", "train_tokens")
            ),
            strict=True,
        ),
    )
    if reader.origin is None:
        _write_csv(
            target / DATA_ORDER,
            ["train_step", "batch_position", "sequence_index"],
            _data_order(reader, n_steps),
        )
    provenance = EXPORT_FORMAT | {
        "store": str(family.path),
        "family": family.spec.name,
        "size": run.size,
        "seed": run.seed,
        "init_seed": run.init_seed,
        "data_seed": run.data_seed,
        "branch": _branch_provenance(reader),
        "steps": steps,
        "tokens_seen": [step * family.spec.train.tokens_per_step for step in steps],
        "config_hash": hashed,
        "spec": family.spec.to_dict(),
        "data": family.attrs["data"],
        "data_order": DATA_ORDER if reader.origin is None else None,
        "metrics": METRICS,
        "origin": reader.origin,
        "library_versions": family.attrs.get("versions"),
    }
    (target / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")


def _branch_provenance(reader) -> dict[str, Any] | None:
    """A branch's provenance for its export (None for a run): its name and path, the run or
    branch it forks from, the fork step, the intervention (JSON) and its SHA-256, what ablating
    and freezing mean, and ``lineage``: every branch from the run to this one
    (:meth:`~observatory.store.RunReader.lineage`)."""
    if reader.branch is None:
        return None
    keys = ("parent", "fork", "intervention", "intervention_sha256", "definitions")
    return (
        {"name": reader.run.branch, "path": reader.run.path}
        | {key: reader.branch[key] for key in keys}
        | {"lineage": reader.lineage()}
    )


def _text_tokenizer(family) -> Any:
    """The family's ``transformers`` tokenizer, or None for token ids (and bytes)."""
    from observatory.query import tokenizer

    if not family.attrs.get("data", {}).get("tokenizer"):
        return None
    return tokenizer(family.path)


@contextmanager
def _no_hf_progress_bars() -> Iterator[None]:
    """No "Writing model shards" / "Loading weights" bar for every checkpoint."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _data_order(reader, n_steps: int) -> Iterator[tuple[int, int, int]]:
    """``(train_step, batch_position, sequence_index)`` of every sequence of the first steps."""
    for step, row in enumerate(reader.batch_indices_between(0, n_steps)):
        for position, index in enumerate(row):
            yield step, position, int(index)


def _write_csv(path: Path, header: list[str], rows) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)


# --------------------------------------------------------------------------------------------
# Ingest: finding checkpoints.


@dataclass(frozen=True)
class CheckpointSeries:
    """The checkpoints of one run: a step -> folder map, and an export's provenance if any."""

    source: Path  # the directory or mapping file given
    folders: dict[int, Path]  # sorted by step
    provenance: dict[str, Any] | None

    @property
    def steps(self) -> list[int]:
        return list(self.folders)


def find_checkpoints(source: str | Path) -> CheckpointSeries:
    """The checkpoint folders of one run.

    Parameters
    ----------
    source
        A directory whose subfolders are named ``step{N}`` or ``checkpoint-{N}`` (Pythia's and
        the Hugging Face Trainer's names), or a mapping file: JSON ``{"<step>": "<folder>"}`` or
        CSV with columns ``step,path``, folders relative to the file.

    Returns
    -------
    CheckpointSeries

    Raises
    ------
    InteropError
        If the source does not exist, holds no checkpoint, or names a step twice.
    """
    source = Path(source)
    if source.is_file():
        pairs = _mapping_pairs(source)
        base = source.parent
    elif source.is_dir():
        pairs = [
            (int(match.group(1)), child.name)
            for child in sorted(source.iterdir())
            if child.is_dir() and (match := STEP_FOLDER.fullmatch(child.name))
        ]
        base = source
    else:
        raise InteropError(f"{source}: no such checkpoint directory or mapping file")
    if not pairs:
        raise InteropError(
            f"{source}: no checkpoints (expected folders step<N>/ or checkpoint-<N>/, "
            "or a .json/.csv mapping of steps to folders)"
        )
    folders: dict[int, Path] = {}
    for step, folder in pairs:
        if step in folders:
            raise InteropError(f"{source}: step {step} appears twice ({folders[step]}, {folder})")
        folders[step] = base / folder
    for folder in folders.values():
        if not (folder / "config.json").is_file():
            raise InteropError(f"{folder}: not a Hugging Face checkpoint (no config.json)")
    provenance = _provenance(base / PROVENANCE) if (base / PROVENANCE).is_file() else None
    return CheckpointSeries(source, dict(sorted(folders.items())), provenance)


def _provenance(path: Path) -> dict[str, Any]:
    """An export's ``observatory.json``, with the entries ingest reads."""
    try:
        provenance = json.loads(path.read_text())
        keys = ("format", "spec", "size", "seed", "init_seed", "data_seed", "data")
        missing = [key for key in keys if key not in provenance]
    except (ValueError, TypeError) as err:
        raise InteropError(f"{path}: not an export's provenance ({_first_line(err)})") from None
    if missing or provenance["format"] != EXPORT_FORMAT["format"]:
        raise InteropError(f"{path}: not an observatory export (missing {', '.join(missing)})")
    return provenance


def _mapping_pairs(path: Path) -> list[tuple[int, str]]:
    """``(step, folder)`` pairs of a JSON or CSV mapping file, duplicates kept (and caught)."""
    try:
        if path.suffix == ".json":
            pairs = json.loads(path.read_text(), object_pairs_hook=list)
            return [(int(step), str(folder)) for step, folder in pairs]
        if path.suffix == ".csv":
            with path.open(newline="") as file:
                return [(int(row["step"]), row["path"]) for row in csv.DictReader(file)]
    except (ValueError, KeyError, TypeError) as err:
        raise InteropError(f"{path}: not a step mapping ({type(err).__name__}: {err})") from None
    raise InteropError(f"{path}: a mapping file must be .json or .csv")


# --------------------------------------------------------------------------------------------
# Ingest: the family.


def ingest(
    sources: Sequence[str | Path],
    out: str | Path,
    *,
    name: str | None = None,
    size: str | None = None,
    context: int | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> Path:
    """Ingest series of Hugging Face checkpoints as the seeds of one family in a new store.

    Parameters
    ----------
    sources
        One directory (or mapping file, see :func:`find_checkpoints`) per run; the runs become
        seeds 0, 1, ... of the family (an export keeps its recorded seeds and spec).
    out
        The new store, on a local disk; it must not exist, nor be inside a source.
    name, size
        Family and size names (default: the store's file name and ``l<layers>-d<d_model>``):
        letters, digits, ``.``, ``_`` and ``-``.
    context
        Sequence length of the analyses' probe and held-out data (default: the model's
        position table).
    batch_size
        Sequences per training step of the original run, for the ``tokens_seen`` coordinate
        (``step * batch_size * context``; default 1).
    progress
        Show a progress bar per run.

    An export carries its own family and size names, context and batch size: giving ``name``,
    ``size``, ``context`` or ``batch_size`` for one is refused (they would contradict its
    recorded spec and metrics).

    Returns
    -------
    pathlib.Path
        The store.

    Raises
    ------
    ObservatoryError
        On an invalid option, a missing or empty source, a step that appears twice, checkpoints
        of different architectures or configs, an unsupported model type, a checkpoint that
        does not load, or an existing ``out``; nothing is left at ``out``.
    """
    from observatory.store import create_family, write_size_attrs

    options = {"name": name, "size": size, "context": context, "batch_size": batch_size}
    out = _check_options(sources, out, options)
    series = [find_checkpoints(source) for source in sources]
    for folder in (f for one in series for f in one.folders.values()):
        _check_outside(out, folder, folder)
    exported = [one.source for one in series if one.provenance is not None]
    given = [flag for key, flag in EXPORT_KEEPS.items() if options[key] is not None]
    if exported and given:
        raise InteropError(
            f"{exported[0]}: an observatory export keeps its recorded family, size, context and "
            f"batch size; leave out {', '.join(given)}"
        )
    config = _common_config(series)
    for folder in (f for one in series for f in one.folders.values()):
        _check_weight_files(folder)  # headers only: a bad file is refused before the store exists
    spec, runs, data = _family(series, config, name or out.stem, size, context, batch_size or 1)
    created = _first_missing(out)  # what to remove on failure: out and the folders made for it
    try:
        root = create_family(out, spec, data=data)
        write_size_attrs(root, spec.model.sizes[0], hf_config=config.to_dict())
        with _no_hf_progress_bars():
            for one, run in zip(series, runs, strict=True):
                _ingest_run(root, spec, run, one, config_hash(config), progress=progress)
    except BaseException:
        shutil.rmtree(created, ignore_errors=True)  # all new: nothing but our partial copy
        raise
    return out


def _check_options(sources: Sequence[str | Path], out: str | Path, options: dict) -> Path:
    """The store path, after checking every option the same way whatever the sources are."""
    from observatory.store import location

    if not sources:
        raise InteropError("no checkpoint directories given")
    for key, least in (("context", 2), ("batch_size", 1)):  # a spec's own minimums
        value = options[key]
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < least
        ):
            expected = "a positive number" if least == 1 else f"at least {least}"
            raise InteropError(f"{EXPORT_KEEPS[key]}: expected {expected}, got {value!r}")
    for key in ("name", "size"):
        value = options[key]
        if value is not None and not (isinstance(value, str) and NAME.fullmatch(value)):
            raise InteropError(
                f"{EXPORT_KEEPS[key]}: expected a name of letters, digits, '.', '_' and '-' "
                f"(not starting with '.', at most 100), got {value!r}"
            )
    if not isinstance(location(out), Path):
        raise InteropError(f"--out {out}: ingest writes a local store (copy it afterwards)")
    out = Path(out)
    if out.exists() or out.is_symlink():
        kind = "a file" if out.is_file() else "already exists"
        raise InteropError(f"--out {out}: {kind}; ingest into a new store")
    resolved = [Path(source).resolve() for source in sources]
    for source, path in zip(sources, resolved, strict=True):
        if resolved.count(path) > 1:
            raise InteropError(f"{source}: given twice; each directory is one run")
        _check_outside(out, path, source)
    return out


def _check_outside(out: Path, folder: Path, source: str | Path) -> None:
    """The new store is not inside a checkpoint directory (a mapping file's folders are checked
    once they are read): removing it on failure must never touch a source."""
    if folder.is_dir() and out.resolve().is_relative_to(folder.resolve()):
        raise InteropError(f"--out {out}: inside the checkpoint source {source}")


def _first_missing(path: Path) -> Path:
    """The outermost folder of ``path`` that does not exist yet (``path`` itself, or a parent)."""
    path = path.absolute()
    while not path.parent.exists():
        path = path.parent
    return path


def _common_config(series: list[CheckpointSeries]) -> Any:
    """The config every checkpoint shares; an error names the first one that differs."""
    from transformers import AutoConfig

    from observatory.models.registry import model_types

    supported = model_types()  # importing each architecture registers its model type
    reference, first = None, None
    for folder in (f for one in series for f in one.folders.values()):
        try:
            config = AutoConfig.from_pretrained(folder)
        except Exception as err:  # not JSON, no model_type, values of the wrong type, ...
            raise InteropError(f"{folder}: cannot read config.json ({_first_line(err)})") from None
        if config.model_type not in supported:
            raise InteropError(
                f"{folder}: model type {config.model_type!r} is not supported "
                f"(supported: {', '.join(supported)})"
            )
        if reference is None:
            reference, first = config, folder
        elif config_hash(config) != config_hash(reference):
            raise InteropError(
                f"{folder}: mixed architectures: its config differs from {first}'s "
                f"({_first_difference(reference, config)})"
            )
    return reference


def _first_difference(a: Any, b: Any) -> str:
    left, right = a.to_dict(), b.to_dict()
    for key in sorted(set(left) | set(right)):
        if key not in VOLATILE_CONFIG_KEYS and left.get(key) != right.get(key):
            return f"{key}: {left.get(key)!r} vs {right.get(key)!r}"
    return "same entries"


def _family(series, config, name, size, context, batch_size) -> tuple[RunSpec, list[RunId], dict]:
    """The spec, runs and corpus facts of the new store: an export's own, or derived."""
    provenances = [one.provenance for one in series]
    if any(provenances):
        if not all(provenances):
            raise InteropError("some directories are observatory exports and some are not")
        return _exported_family(series)
    spec = _derived_spec(config, name, size, context, batch_size, len(series), series)
    runs = spec.runs()
    data = {"ingested": True, "fingerprint": None}
    return spec, runs, data


def _exported_family(series: list[CheckpointSeries]) -> tuple[RunSpec, list[RunId], dict]:
    first = series[0].provenance
    for one in series:
        if (one.provenance["spec"], one.provenance["size"]) != (first["spec"], first["size"]):
            raise InteropError(
                f"{one.source}: exported from another family or size than {series[0].source}"
            )
    runs = [
        RunId(size=p["size"], seed=p["seed"], init_seed=p["init_seed"], data_seed=p["data_seed"])
        for p in (one.provenance for one in series)
    ]
    seeds = [run.seed for run in runs]
    if len(set(seeds)) != len(seeds):
        branches = [one.source for one in series if one.provenance.get("branch")]
        hint = f"; {branches[0]} is a branch's export: ingest it on its own" if branches else ""
        raise InteropError(
            f"the same seed is exported twice among the directories (seeds {seeds}){hint}"
        )
    try:
        spec = spec_from_dict(first["spec"])
    except ObservatoryError as err:
        raise InteropError(
            f"{series[0].source / PROVENANCE}: its spec is invalid ({err})"
        ) from None
    return spec, runs, first["data"]


def _derived_spec(config, name, size, context, batch_size, n_runs, series) -> RunSpec:
    """A spec describing checkpoints that carry none: architecture from the config."""
    from observatory.models.registry import of_config

    declared = of_config(config)
    n_positions = config.max_position_embeddings
    context = n_positions if context is None else context
    if context > n_positions:
        raise InteropError(
            f"--context: {context} tokens do not fit the model's {n_positions} positions"
        )
    period_max = max(1, min(32, context - 1))
    model_keys, size_keys = declared.spec_keys(config)
    model = {"architecture": declared.name, "vocab_size": config.vocab_size} | model_keys
    shape = {
        "name": size or f"l{config.num_hidden_layers}-d{config.hidden_size}",
        "n_layers": config.num_hidden_layers,
        "d_model": config.hidden_size,
        "n_heads": config.num_attention_heads,
        "n_positions": n_positions,
    } | size_keys
    steps = sorted({step for one in series for step in one.steps})
    if steps[-1] * batch_size * context >= 2**63:  # tokens seen are stored as int64
        raise InteropError(
            f"the tokens seen by step {steps[-1]} ({batch_size} x {context} per step) overflow "
            "the store's 64-bit counts; check --batch-size and the step numbers"
        )
    table = {
        "name": name,
        "model": model | {"sizes": [shape]},
        # The analyses' probe and held-out sequences: fresh synthetic induction data.
        "data": {
            "source": "induction",
            "n_sequences": 64,
            "period_min": min(8, period_max),
            "period_max": period_max,
        },
        "seeds": {"init": list(range(n_runs))},
        "train": {"steps": max(steps[-1], 1), "batch_size": batch_size, "context": context},
        "checkpoints": {"log_spaced": False, "extra": steps},
    }
    try:
        return spec_from_dict(table)
    except ObservatoryError as err:
        raise InteropError(f"cannot describe these checkpoints: {str(err).lstrip('.: ')}") from None


# --------------------------------------------------------------------------------------------
# Ingest: one run.


def _ingest_run(
    root, spec: RunSpec, run: RunId, series: CheckpointSeries, hashed: str, *, progress: bool
) -> None:
    """Write the checkpoints (and an export's metrics) of one run."""
    from tqdm.auto import tqdm

    from observatory.store import Checkpoint, RunWriter

    size = spec.size(run.size)
    origin = {
        "kind": "ingested",
        "path": str(series.source.resolve()),
        "config_hash": hashed,
        "steps": series.steps,
        "exported_from": (series.provenance or {}).get("store"),
        # An exported branch stays one: its parent, fork and intervention (the weights before
        # the fork are its parent's).
        "branch": (series.provenance or {}).get("branch"),
    }
    writer = None
    finished = False
    try:
        for step in tqdm(
            series.steps, desc=f"ingest {run.path}", unit="ckpt", disable=not progress
        ):
            params = _load(series.folders[step])
            if writer is None:
                _check_parameters(series.folders[step], params, spec)
                writer = RunWriter(
                    root,
                    run,
                    spec,
                    param_shapes={k: v.shape for k, v in params.items()},
                    d_head=size.d_head,
                    schedule=tuple(series.steps),
                    rng_bytes=0,
                    data_order_fingerprint=None,
                    origin=origin,
                )
                writer.start()
            tokens = step * spec.train.tokens_per_step
            writer.put_checkpoint(Checkpoint(step=step, tokens_seen=tokens, params=params))
        for record in _metrics(series):
            writer.put_step(record)
        finished = True
    finally:
        if writer is not None:
            writer.close(complete=finished)


def _load(folder: Path) -> dict[str, np.ndarray]:
    """The stacked float32 parameters of one checkpoint folder (whose files
    :func:`_check_weight_files` passed), checked to be all there and finite."""
    import torch
    from transformers import AutoModelForCausalLM

    from observatory.models import stack_layers

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=torch.float32,
            attn_implementation="eager",
            use_safetensors=True,
            output_loading_info=True,
        )
    except Exception as err:  # transformers and safetensors raise many kinds for a bad file
        raise InteropError(f"{folder}: cannot load the checkpoint ({_first_line(err)})") from None
    # A tensor missing from the file would silently keep its random initialisation.
    for kind in ("missing_keys", "mismatched_keys"):
        if info.get(kind):
            names = ", ".join(str(key) for key in sorted(info[kind], key=str)[:3])
            raise InteropError(
                f"{folder}: the weights do not match config.json "
                f"({kind.replace('_', ' ')}: {names})"
            )
    params = stack_layers(dict(model.named_parameters()))
    for name, array in params.items():
        # Refused: a diverged checkpoint has nothing to analyse, and every analysis of it
        # would store NaN, which readers take for "not analysed".
        if not np.isfinite(array).all():
            raise InteropError(f"{folder}: tensor {name!r} has NaN or infinite values")
    return params


def _check_weight_files(folder: Path) -> None:
    """``model.safetensors`` (or its shards) is there, readable, and holds float tensors that
    float32 represents exactly; a pickled ``pytorch_model.bin`` is not read."""
    from safetensors import safe_open

    if (folder / WEIGHTS_INDEX).is_file():
        try:
            index = json.loads((folder / WEIGHTS_INDEX).read_text())
            files = sorted({folder / shard for shard in index["weight_map"].values()})
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise InteropError(f"{folder}: {WEIGHTS_INDEX} is not a shard index ({err})") from None
    elif (folder / WEIGHTS).is_file():
        files = [folder / WEIGHTS]
    elif any(folder.glob("pytorch_model*.bin")):
        raise InteropError(
            f"{folder}: holds pytorch_model.bin (a pickle, which is not read) and no {WEIGHTS}; "
            "save the model with save_pretrained(..., safe_serialization=True)"
        )
    else:
        raise InteropError(f"{folder}: no {WEIGHTS}")
    for file in files:
        try:
            with safe_open(file, framework="numpy") as tensors:
                dtypes = {key: tensors.get_slice(key).get_dtype() for key in tensors.keys()}  # noqa: SIM118
        except Exception as err:  # SafetensorError, OSError: a truncated or corrupt file
            raise InteropError(f"{folder}: cannot read {file.name} ({_first_line(err)})") from None
        for key, dtype in dtypes.items():
            if dtype not in EXACT_DTYPES:
                raise InteropError(
                    f"{folder}: tensor {key!r} is {dtype}; weights must be float32, float16 "
                    "or bfloat16"
                )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _check_parameters(folder: Path, params: dict[str, np.ndarray], spec: RunSpec) -> None:
    """Every parameter has known dims and the per-head views can be built from them."""
    from observatory.models import parameter_dims, transformer_lens_weights

    try:
        for name in params:
            parameter_dims(name)
        transformer_lens_weights(
            params, architecture=spec.model.architecture, n_heads=spec.model.sizes[0].n_heads
        )
    except KeyError as err:
        raise InteropError(
            f"{folder}: unsupported parameter layout ({err.args[0]}); tied embeddings and "
            "attention without biases are not supported"
        ) from None


def _metrics(series: CheckpointSeries) -> Iterator[Any]:
    """An export's per-step metrics as step records (none for other checkpoints)."""
    from observatory.store import StepRecord

    if series.provenance is None or not (series.source / METRICS).is_file():
        return
    path = series.source / METRICS
    with path.open(newline="") as file:
        for expected, row in enumerate(csv.DictReader(file)):
            try:
                record = StepRecord(
                    step=int(row["train_step"]),
                    loss=float(row["loss"]),
                    lr=float(row["lr"]),
                    grad_norm=float(row["grad_norm"]),
                    tokens_seen=int(row["train_tokens"]),
                    batch_indices=None,
                )
            except (ValueError, KeyError, TypeError) as err:
                raise InteropError(
                    f"{path}: row {expected + 1} is not a metrics row ({err})"
                ) from None
            if record.step != expected:
                raise InteropError(f"{path}: steps must be 0, 1, 2, ...")
            yield record
