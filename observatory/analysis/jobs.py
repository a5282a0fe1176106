"""Analysis jobs: a TOML spec, split into (run, checkpoint block) tasks on dask.distributed.

Workers load only the checkpoints of their block, call the pure analysis functions and return
numpy arrays; the client writes them into the store (one writer, no locking), so a job can run
while training is still writing and a re-run computes only what is missing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from observatory.errors import SpecError
from observatory.spec import DataSpec, RunId, RunSpec, load_spec

ANALYSES = ("head_scores", "copying", "icl", "token_loss")
Analysis = Literal["head_scores", "copying", "icl", "token_loss"]


@dataclass(frozen=True)
class ProbeSpec:
    """The repeated-random-token probe (Olsson et al.: 25 tokens x 4 after a BOS, 10 seqs)."""

    seed: int = 1234
    n_sequences: int = 10
    block_length: int = 25
    repeats: int = 4

    def validate(self, where: str) -> None:
        for key in ("n_sequences", "block_length"):
            if getattr(self, key) < 1:
                raise SpecError(f"{where}.{key}: must be positive")
        if self.repeats < 2:
            raise SpecError(f"{where}.repeats: need at least 2 repeats")


@dataclass(frozen=True)
class HeadScoreSpec:
    """Head-score convention; the exclusions apply to TransformerLens-convention scores only."""

    convention: Literal["prefix_matching", "transformer_lens"] = "prefix_matching"
    exclude_bos: bool = False  # TransformerLens: zero the BOS column before summing
    exclude_current_token: bool = False  # TransformerLens: zero the diagonal before summing
    transformer_lens_too: bool = True  # also store tl_* scores (TransformerLens detect_head)

    def options(self, convention: str) -> dict[str, bool]:
        """Keyword options of ``head_scores`` for ``convention``."""
        if convention == "prefix_matching":
            return {}
        return {
            "exclude_bos": self.exclude_bos,
            "exclude_current_token": self.exclude_current_token,
        }

    def validate(self, where: str) -> None:
        uses_tl = self.convention == "transformer_lens" or self.transformer_lens_too
        if (self.exclude_bos or self.exclude_current_token) and not uses_tl:
            raise SpecError(
                f"{where}.exclude_bos: exclusions apply to the TransformerLens convention only"
            )


@dataclass(frozen=True)
class HeldOutSpec:
    """Held-out sequences for the ICL score and per-token losses."""

    seed: int = 4321  # synthetic corpora: a fresh corpus from this seed; text: sample seed
    n_sequences: int = 64

    def validate(self, where: str) -> None:
        if self.n_sequences < 2:
            raise SpecError(f"{where}.n_sequences: need at least 2 sequences")


@dataclass(frozen=True)
class ExecutionSpec:
    block_size: int = 16  # checkpoints per task
    workers: int = 0  # local cluster size (0: one per core)

    def validate(self, where: str) -> None:
        if self.block_size < 1:
            raise SpecError(f"{where}.block_size: must be positive")
        if self.workers < 0:
            raise SpecError(f"{where}.workers: must be >= 0")


@dataclass(frozen=True)
class AnalysisSpec:
    """An analysis job over a family store."""

    store: str
    analyses: tuple[Analysis, ...] = ANALYSES
    sizes: tuple[str, ...] = ()  # empty: every size in the store
    seeds: tuple[int, ...] = ()  # empty: every seed
    steps: tuple[int, ...] = ()  # empty: every committed checkpoint
    every: int = 1  # take every n-th checkpoint (after `steps`)
    threshold: float = 0.5  # induction score that counts as "formed" (summary)
    probe: ProbeSpec = field(default_factory=ProbeSpec)
    head_scores: HeadScoreSpec = field(default_factory=HeadScoreSpec)
    held_out: HeldOutSpec = field(default_factory=HeldOutSpec)
    execution: ExecutionSpec = field(default_factory=ExecutionSpec)

    def validate(self, where: str) -> None:
        if not self.analyses:
            raise SpecError(f"{where}.analyses: the list is empty (choose from {ANALYSES})")
        if len(set(self.analyses)) != len(self.analyses):
            raise SpecError(f"{where}.analyses: duplicate entries {list(self.analyses)}")
        if self.every < 1:
            raise SpecError(f"{where}.every: must be positive")
        if not 0 < self.threshold < 1:
            raise SpecError(f"{where}.threshold: must be in (0, 1)")
        if any(s < 0 for s in self.steps):
            raise SpecError(f"{where}.steps: steps must be >= 0")


def load_analysis_spec(path: str | Path) -> AnalysisSpec:
    """Load and validate an analysis job spec (``analyses/*.toml``).

    A relative ``store`` is relative to the current directory.

    Raises
    ------
    SpecError
        With a one-line message naming the offending key.
    """
    return load_spec(AnalysisSpec, path)


# --------------------------------------------------------------------------------------------
# What every task needs: the probe and held-out data (same for every checkpoint and seed).


@dataclass(frozen=True)
class Plan:
    """Everything a task needs besides its checkpoints; built once per job on the client."""

    analyses: tuple[str, ...]
    probe_tokens: np.ndarray  # [probe_sequence, probe_position]
    held_out_tokens: np.ndarray  # [held_out_sequence, position]
    loss_positions: np.ndarray  # [held_out_sequence]
    icl_early: int
    icl_late: int
    head_scores: HeadScoreSpec
    attrs: dict[str, dict]  # analysis name -> parameters stored with its results


def held_out_tokens(run_spec: RunSpec, spec: HeldOutSpec) -> tuple[np.ndarray, str]:
    """Held-out sequences and a note of where they come from (stored as an attribute)."""
    context, vocab = run_spec.train.context, run_spec.model.vocab_size
    data: DataSpec = run_spec.data
    if data.source == "induction":
        fresh = dataclasses.replace(data, seed=spec.seed, n_sequences=spec.n_sequences)
        corpus = fresh.build(context=context, vocab_size=vocab)
        return corpus.tokens, f"fresh synthetic corpus, seed {spec.seed}"
    corpus = data.build(context=context, vocab_size=vocab)
    rng = np.random.default_rng(spec.seed)
    picks = rng.choice(len(corpus), size=min(spec.n_sequences, len(corpus)), replace=False)
    return corpus.tokens[np.sort(picks)], f"sampled from the training text, seed {spec.seed}"


def make_plan(spec: AnalysisSpec, run_spec: RunSpec) -> Plan:
    """Generate the probe and held-out data from their recorded seeds."""
    from observatory.analysis import (
        head_score_attrs,
        icl_positions,
        loss_positions,
        repeated_tokens,
    )

    context = run_spec.train.context
    probe = repeated_tokens(
        vocab_size=run_spec.model.vocab_size,
        n_ctx=context,
        seed=spec.probe.seed,
        n_sequences=spec.probe.n_sequences,
        block_length=spec.probe.block_length,
        repeats=spec.probe.repeats,
    )
    held_out, source = held_out_tokens(run_spec, spec.held_out)
    early, late = icl_positions(held_out.shape[1])
    positions = loss_positions(
        n_sequences=len(held_out), n_losses=held_out.shape[1] - 1, seed=spec.held_out.seed
    )
    held_out_attrs = {"held_out": source, "held_out_n_sequences": int(len(held_out))}
    return Plan(
        analyses=spec.analyses,
        probe_tokens=probe.tokens,
        held_out_tokens=held_out,
        loss_positions=positions,
        icl_early=early,
        icl_late=late,
        head_scores=spec.head_scores,
        attrs={
            "head_scores": probe.attrs
            | head_score_attrs(
                convention=spec.head_scores.convention,
                **spec.head_scores.options(spec.head_scores.convention),
            )
            | {
                "transformer_lens_too": spec.head_scores.transformer_lens_too,
                "threshold": spec.threshold,  # read by the summary and the report
            },
            "copying": {"copying_score": "Re(sum eig) / sum |eig| of W_E W_V W_O W_U"},
            "icl": held_out_attrs
            | {
                "icl_early_position": early,
                "icl_late_position": late,
                "icl_convention": "loss at late minus loss at early (Olsson 500 vs 50 of 512)",
            },
            "token_loss": held_out_attrs | {"loss_positions_seed": spec.held_out.seed},
        },
    )


def result_variables(
    plan: Plan, *, n_layers: int, n_heads: int
) -> dict[str, dict[str, tuple[tuple[str, ...], tuple[int, ...]]]]:
    """Dims and shapes (after ``step``) of every result variable, by analysis."""
    heads = (("layer", "head"), (n_layers, n_heads))
    scores = ("induction_score", "previous_token_score", "duplicate_token_score")
    head_vars = {name: heads for name in scores}
    if plan.head_scores.transformer_lens_too:
        head_vars |= {f"tl_{name}": heads for name in scores}
    n_positions = plan.held_out_tokens.shape[1] - 1
    return {
        "head_scores": head_vars,
        "copying": {"copying_score": heads},
        "icl": {"icl_score": ((), ()), "loss_by_position": (("position",), (n_positions,))},
        "token_loss": {"token_loss": (("held_out",), (len(plan.held_out_tokens),))},
    }


# --------------------------------------------------------------------------------------------
# The task: one run, a block of checkpoints.


def analyse_block(
    store: str, size: str, seed: int, steps: list[int], plan: Plan
) -> dict[str, dict[str, np.ndarray]]:
    """Run the job's analyses on a block of checkpoints of one run (executes on a worker).

    Returns
    -------
    dict
        ``{analysis: {variable: values[len(steps), ...]}}``.
    """
    import torch

    from observatory.analysis import (
        attention_patterns,
        copying_score,
        head_scores,
        icl_score,
        token_losses,
    )
    from observatory.models import model_weights
    from observatory.query import models_at

    # One thread per task: the cluster runs one task per core, and oversubscribed torch
    # threads slow everything down.
    torch.set_num_threads(1)
    options = plan.head_scores
    rows: dict[str, dict[str, list]] = {name: {} for name in plan.analyses}

    def add(analysis: str, variable: str, value) -> None:
        rows[analysis].setdefault(variable, []).append(value)

    for _, model in models_at(store, size=size, seed=seed, steps=steps):
        if "head_scores" in plan.analyses:
            patterns = attention_patterns(model, plan.probe_tokens)
            conventions = [("", options.convention)]
            if options.transformer_lens_too:
                conventions.append(("tl_", "transformer_lens"))
            for prefix, convention in conventions:
                scores = head_scores(
                    patterns,
                    plan.probe_tokens,
                    convention=convention,
                    **options.options(convention),
                )
                for kind in ("induction", "previous_token", "duplicate_token"):
                    add("head_scores", f"{prefix}{kind}_score", scores[kind])
        if "copying" in plan.analyses:
            add("copying", "copying_score", copying_score(model_weights(model)))
        if "icl" in plan.analyses or "token_loss" in plan.analyses:
            losses = token_losses(model, plan.held_out_tokens)  # [held_out, position]
            if "icl" in plan.analyses:
                add("icl", "icl_score", icl_score(losses, early=plan.icl_early, late=plan.icl_late))
                add("icl", "loss_by_position", losses.mean(axis=0))
            if "token_loss" in plan.analyses:
                picked = losses[np.arange(len(losses)), plan.loss_positions]
                add("token_loss", "token_loss", picked)
    return {
        analysis: {var: np.asarray(values, dtype=np.float32) for var, values in variables.items()}
        for analysis, variables in rows.items()
    }


def select_runs(spec: AnalysisSpec, runs: list[RunId]) -> list[RunId]:
    """The job's runs among those present; a clear error if a named size or seed is absent."""
    sizes = {r.size for r in runs}
    seeds = {r.seed for r in runs}
    for size in spec.sizes:
        if size not in sizes:
            raise SpecError(f"sizes: no size {size!r} in the store (sizes: {sorted(sizes)})")
    for seed in spec.seeds:
        if seed not in seeds:
            raise SpecError(f"seeds: no seed {seed} in the store (seeds: {sorted(seeds)})")
    return [
        r
        for r in runs
        if (not spec.sizes or r.size in spec.sizes) and (not spec.seeds or r.seed in spec.seeds)
    ]


def select_steps(spec: AnalysisSpec, committed: np.ndarray) -> list[int]:
    """The job's checkpoint steps among a run's committed ones (missing ones are skipped)."""
    steps = [int(s) for s in committed if not spec.steps or int(s) in spec.steps]
    return steps[:: spec.every]


# --------------------------------------------------------------------------------------------
# The job.


@dataclass(frozen=True)
class JobReport:
    """What a job did: checkpoints analysed, skipped as already done, and the runs touched."""

    computed: int
    skipped: int
    runs: tuple[str, ...]


def run_analysis(
    spec: AnalysisSpec,
    *,
    scheduler: str | None = None,
    recompute: bool = False,
    progress: bool = True,
) -> JobReport:
    """Run an analysis job over every selected run and checkpoint, writing into the store.

    Parameters
    ----------
    spec
        The job.
    scheduler
        Address of a running dask scheduler (``tcp://host:8786``); default: a local cluster
        with one single-threaded worker process per core (or ``execution.workers``).
    recompute
        Replace existing results instead of skipping the checkpoints they cover.
    progress
        Show a progress bar over checkpoints.

    Returns
    -------
    JobReport
    """
    from observatory.cluster import dask_client
    from observatory.store import AnalysisWriter, FamilyStore

    family = FamilyStore(spec.store, mode="r+")
    runs = select_runs(spec, family.runs())
    plan = make_plan(spec, family.spec)
    writers: dict[str, dict[str, AnalysisWriter]] = {}
    blocks: list[tuple[RunId, list[int]]] = []
    skipped = 0
    for run in runs:
        reader = family.run(run.size, run.seed)
        size = family.spec.size(run.size)
        variables = result_variables(plan, n_layers=size.n_layers, n_heads=size.n_heads)
        writers[run.path] = {
            name: AnalysisWriter(
                reader,
                name,
                attrs=plan.attrs[name],
                variables=variables[name],
                recompute=recompute,
            )
            for name in plan.analyses
        }
        if "head_scores" in writers[run.path]:
            writers[run.path]["head_scores"].write_extra(
                "probe_tokens", plan.probe_tokens, ("probe_sequence", "probe_position")
            )
        done = set.intersection(*(w.done_steps() for w in writers[run.path].values()))
        wanted = select_steps(spec, reader.steps())
        pending = [s for s in wanted if s not in done]
        skipped += len(wanted) - len(pending)
        size_ = spec.execution.block_size
        blocks += [(run, pending[i : i + size_]) for i in range(0, len(pending), size_)]

    computed = 0
    if blocks:
        with dask_client(scheduler=scheduler, workers=spec.execution.workers) as client:
            computed = _run_blocks(client, family, blocks, plan, writers, progress=progress)
    return JobReport(computed=computed, skipped=skipped, runs=tuple(r.path for r in runs))


def _run_blocks(client, family, blocks, plan, writers, *, progress: bool) -> int:
    """Submit every block and write each result as it arrives; returns checkpoints done."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    computed = 0
    try:
        shared_plan = client.scatter(plan, broadcast=True)
        futures = [
            client.submit(
                analyse_block,
                str(family.path),
                run.size,
                run.seed,
                steps,
                shared_plan,
                pure=False,
            )
            for run, steps in blocks
        ]
        owner = {f.key: (run, steps) for f, (run, steps) in zip(futures, blocks, strict=True)}
        total = sum(len(steps) for _, steps in blocks)
        with tqdm(total=total, unit="ckpt", desc="analyse", disable=not progress) as bar:
            for future in as_completed(futures):
                run, steps = owner[future.key]
                _write_block(writers[run.path], steps, future.result())
                computed += len(steps)
                bar.update(len(steps))
    finally:
        # Even after Ctrl-C or a failed task, keep what was computed: a re-run skips it.
        for run_writers in writers.values():
            for writer in run_writers.values():
                writer.flush()
    return computed


def _write_block(writers, steps: list[int], results: dict[str, dict[str, np.ndarray]]) -> None:
    """Append a block's rows to each analysis, skipping steps that analysis already has."""
    for name, writer in writers.items():
        done = writer.done_steps()
        keep = np.array([s not in done for s in steps])
        if keep.any():
            values = {var: rows[keep] for var, rows in results[name].items()}
            writer.append(np.asarray(steps)[keep], values)
