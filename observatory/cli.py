"""The ``observatory`` command: a thin layer over the library.

Each command is a handler ``_cmd_<name>(args)`` whose docstring is its help (the first line, in
``observatory --help``) and its description (the rest, in ``observatory <name> --help``), and a
function that builds its parser beside it.  Options several commands share are defined once,
as argparse parent parsers (:class:`_Options`).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from observatory.errors import ObservatoryError

_DIGITS = re.compile(r"[0-9]+")
MAX_LIST = 10**6  # entries of a --seeds/--steps list: a longer range is a typo

# At exit, the interpreter's last collections would traverse every object that torch,
# transformers and zarr created, most of the teardown's time; frozen, they are skipped.
atexit.register(gc.freeze)

DESCRIPTION = """\
Observatory: train seeded model families with dense checkpoints and a recorded data order
into one zarr store, query them lazily with xarray, and track circuit formation across
checkpoints and seeds.

typical session:
  observatory tokenize runs/text.toml                # optional: text into the token cache
  observatory train runs/induction.toml              # every size x seed of the family
  observatory branch runs/induction.toml --run l2-d64/seed0 --at 250 --name no-prev \
      --ablate-head 0.3                              # continue a run with an intervention
  observatory inspect store/induction.zarr           # runs, checkpoints, tokens, disk use
  observatory analyses                               # the built-in analyses and options
  observatory analyze analyses/induction.toml        # circuit-formation scores, on dask
  observatory report store/induction.zarr --out report/   # figures, HTML page, summary table
  observatory verify store/induction.zarr            # checksums, ledger, replay of every step
  observatory transitions store/induction.zarr       # every group of tokens learned abruptly
  observatory attribute store/induction.zarr --size l2-d64 --seed 0 --start 250 --stop 350 \
      --target induction_score --option layer=1 --option head=2   # which updates built it
  observatory dynamics store/induction.zarr --size l2-d64 --seed 0 --start 250 --stop 350
                                                     # what each update moved, per block, head
  observatory export store/induction.zarr --seed 0 --out hf/   # step<N>/ Hugging Face folders
  observatory ingest hf/ --out store/ingested.zarr   # any series of HF checkpoint folders

run `observatory COMMAND --help` for a command's description and options.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; every error prints one line and returns a non-zero exit code.

    A user error (bad spec, store, selection, a full disk, too little memory) exits with 2.
    An unexpected error exits with 1 and prints where its traceback was written;
    ``OBSERVATORY_DEBUG=1`` lets it propagate instead.
    """
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except ObservatoryError as err:
        return _fail(str(err))
    except KeyboardInterrupt as err:
        # zarr's writes in flight are abandoned (commit markers go last, so nothing committed
        # is lost); asyncio would print each abandoned task as a traceback at exit.
        logging.getLogger("asyncio").disabled = True
        signum = getattr(err, "signum", signal.SIGINT)  # training's Interrupted says which
        print(
            f"observatory: interrupted ({signal.Signals(signum).name}); committed checkpoints "
            "are kept (continue with --resume)",
            file=sys.stderr,
        )
        return 128 + signum
    except OSError as err:  # e.g. a full disk or a path that cannot be written
        where = f": {err.filename}" if err.filename else ""
        return _fail(f"{err.strerror or err}{where}")
    except MemoryError:
        return _fail("out of memory (a smaller size, batch or corpus would fit)")
    except Exception:
        if os.environ.get("OBSERVATORY_DEBUG") == "1":
            raise
        return _internal_error()
    return code or 0


def build_parser() -> argparse.ArgumentParser:
    """The ``observatory`` parser: one subcommand per library entry point."""
    parser = _Parser(
        prog="observatory",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    options = _options()
    # In the order of a typical session, as `observatory --help` lists them.
    _tokenize_parser(commands, options)
    _train_parser(commands, options)
    _branch_parser(commands, options)
    _command(commands, "inspect", _cmd_inspect, options.store)
    _command(commands, "analyses", _cmd_analyses)
    _analyze_parser(commands, options)
    _report_parser(commands, options)
    _verify_parser(commands, options)
    _transitions_parser(commands, options)
    _attribute_parser(commands, options)
    _dynamics_parser(commands, options)
    _export_parser(commands, options)
    _ingest_parser(commands, options)
    return parser


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``observatory train: error: ...``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _command(commands, name: str, handler: Callable, *parents: argparse.ArgumentParser):
    """Add the command ``name``, run by ``handler``, whose docstring is the command's help."""
    summary, _, details = handler.__doc__.partition("\n\n")
    parser = commands.add_parser(
        name, parents=parents, help=summary.rstrip("."), description=details or summary
    )
    parser.set_defaults(func=handler)
    return parser


@dataclass(frozen=True)
class _Options:
    """Options several commands share, each defined once as an argparse parent parser."""

    store: argparse.ArgumentParser  # the positional family store
    spec_store: argparse.ArgumentParser  # --store, overriding the store a spec names
    out_dir: argparse.ArgumentParser  # --out DIR, required
    selection: argparse.ArgumentParser  # --sizes, --seeds
    dask: argparse.ArgumentParser  # --scheduler | --workers
    span: argparse.ArgumentParser  # --size, --seed, --start, --stop, --branch: updates of a run
    progress: argparse.ArgumentParser  # --no-progress
    resume: argparse.ArgumentParser  # --resume, --stop-after


def _options() -> _Options:
    def parent() -> argparse.ArgumentParser:
        return argparse.ArgumentParser(add_help=False)

    store, spec_store, out_dir = parent(), parent(), parent()
    store.add_argument("store", help="family store (*.zarr)")
    spec_store.add_argument("--store", help="store path or URL (default: the one the spec names)")
    out_dir.add_argument(
        "--out", required=True, metavar="DIR", help="directory to write into (created if needed)"
    )
    selection = parent()
    selection.add_argument(
        "--sizes",
        "--size",
        type=_names,
        metavar="NAMES",
        help="comma-separated size names (default: all)",
    )
    _add_seeds(selection)
    dask = parent()
    cluster = dask.add_mutually_exclusive_group()
    cluster.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run the tasks on the running dask cluster at ADDRESS, e.g. tcp://host:8786 "
        "(dask-jobqueue on Slurm, ...); every worker must reach the store",
    )
    cluster.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="run the tasks on a local dask cluster of N single-threaded worker processes",
    )
    span = parent()
    span.add_argument("--size", required=True, help="size name")
    span.add_argument("--seed", required=True, type=int, help="seed index")
    span.add_argument("--start", required=True, type=int, help="first training step")
    span.add_argument("--stop", required=True, type=int, help="step after the last one")
    span.add_argument(
        "--branch", default="", metavar="NAME", help="the run's branch NAME (A/B: of a branch)"
    )
    progress = parent()
    progress.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bars"
    )
    resume = parent()
    resume.add_argument(
        "--resume",
        action="store_true",
        help="continue unfinished runs from their last committed checkpoint; skip finished ones",
    )
    resume.add_argument(
        "--stop-after",
        type=_positive_int,
        metavar="N",
        help="stop each run after N steps in this call (continue later with --resume)",
    )
    return _Options(store, spec_store, out_dir, selection, dask, span, progress, resume)


def _add_seeds(parser) -> None:
    """``--seeds``, in a parent parser or in a group of its own (``export``)."""
    parser.add_argument(
        "--seeds",
        type=_int_list("seeds", "0-2 or 0,3"),
        help="seed indices, e.g. 0-2 or 0,3 (default: all)",
    )


# --------------------------------------------------------------------------------------------
# The commands: each one's parser, then its handler.


def _tokenize_parser(commands, options: _Options) -> None:
    tokenize = _command(commands, "tokenize", _cmd_tokenize, options.progress)
    tokenize.add_argument("spec", help="run spec (runs/*.toml) with a text or token-file corpus")


def _cmd_tokenize(args: argparse.Namespace) -> None:
    """Tokenize a run spec's corpus into the on-disk token cache.

    Tokenize the spec's text corpus into the token cache (training its byte-level BPE first if
    tokenizer = "bpe"), or hash its token files once, so that training, replay, verify and the
    analyses memory-map it. `observatory train` does this itself when the cache lacks the
    corpus. The cache is data.cache, else $OBSERVATORY_CACHE, else ~/.cache/observatory.
    """
    from observatory.data.sources import tokenize
    from observatory.spec import load_run_spec

    stream = tokenize(load_run_spec(args.spec), progress=args.progress)
    meta = stream.entry.meta
    speed = ", already in the cache"
    if stream.fresh:
        speed = ", hashed" if "seconds" not in meta else f", {meta['seconds']:.1f} s"
        if meta.get("seconds"):
            speed += f" ({meta['text_bytes'] / meta['seconds'] / 1e6:.1f} MB/s of text)"
    replaced = meta.get("replaced_bytes", 0)
    note = f"\n{replaced} bytes that are not UTF-8 became U+FFFD (data.errors)" if replaced else ""
    print(
        f"{meta['n_tokens']} tokens in {meta['n_documents']} documents{speed}{note}\n"
        f"token cache: {stream.entry.path}"
    )


def _train_parser(commands, options: _Options) -> None:
    parents = (options.spec_store, options.selection, options.dask, options.progress)
    train = _command(commands, "train", _cmd_train, *parents, options.resume)
    train.add_argument("spec", help="run spec (runs/*.toml)")


def _cmd_train(args: argparse.Namespace) -> None:
    """Train a model family from a run spec.

    Train every size x seed of a run spec (or the selected ones) into one zarr store: dense
    checkpoints (weights, AdamW state, RNG state), per-step loss/lr/grad-norm and the corpus
    indices of every batch. Deterministic: the same spec gives the same weights. Runs train one
    after another in this process, or in parallel with --workers or --scheduler (each run uses
    the spec's torch threads).
    """
    from observatory.spec import load_run_spec

    spec = load_run_spec(args.spec)
    # A wrong seed or size fails before anything starts.
    spec.runs(seeds=args.seeds, sizes=args.sizes)
    with _training_client(args, spec.train.threads) as client:
        from observatory.train import train_family

        options = _same_names(args, "store", "seeds", "sizes", "resume", "progress", "stop_after")
        path = train_family(spec, **options, on_run_end=_print_run_summary, client=client)
    print(f"trained into {path}")


@contextlib.contextmanager
def _training_client(args: argparse.Namespace, threads: int):
    """The dask client of --workers or --scheduler (None: train in this process)."""
    from observatory.jobs.cluster import dask_client, warm_import

    # Importing torch takes seconds: this process does it while local workers start and do too.
    importer = threading.Thread(target=_quietly, args=(warm_import, "observatory.train"))
    importer.start()
    cluster = (
        contextlib.nullcontext()
        if args.workers is None and args.scheduler is None
        else dask_client(scheduler=args.scheduler, workers=args.workers or 0, threads=threads)
    )
    with cluster as client:
        importer.join()
        yield client


def _branch_parser(commands, options: _Options) -> None:
    parents = (options.spec_store, options.dask, options.progress, options.resume)
    branch = _command(commands, "branch", _cmd_branch, *parents)
    branch.add_argument("spec", help="the family's run spec (runs/*.toml)")
    branch.add_argument(
        "--run",
        dest="runs",
        action="append",
        required=True,
        type=_run_path,
        metavar="RUN",
        help="the run or branch to fork, e.g. l2-d64/seed0 or l2-d64/seed0/branches/NAME "
        "(repeat it to branch several, each as one task with --workers or --scheduler)",
    )
    branch.add_argument("--at", required=True, type=int, metavar="STEP", help="the fork step")
    branch.add_argument("--name", required=True, help="the new branch's name")
    heads = {"type": _head, "nargs": "+", "action": "extend", "default": [], "metavar": "L.H"}
    branch.add_argument("--ablate-head", **heads, help="ablate these heads while training")
    branch.add_argument("--ablation", choices=("zero", "mean"), default="zero")
    branch.add_argument("--freeze-head", **heads, help="keep these heads' weights as at the fork")
    drop = branch.add_mutually_exclusive_group()
    drop.add_argument(
        "--drop", metavar="FILE.py:NAME", help="drop the windows NAME(tokens) returns True for"
    )
    drop.add_argument(
        "--drop-windows",
        type=_index_file,
        metavar="FILE.txt",
        help="drop the corpus windows listed in FILE.txt (indices, by whitespace or commas)",
    )
    branch.add_argument("--data-seed", type=int, metavar="N", help="re-draw the data order")
    branch.add_argument("--lr", type=float, help="the learning rate from the fork on")
    branch.add_argument("--schedule", choices=("constant", "linear", "cosine"))
    branch.add_argument("--warmup-steps", type=int, metavar="N")


def _cmd_branch(args: argparse.Namespace) -> None:
    """Continue a run from a step with an intervention, as a branch in the same store.

    Take the run's exact training state at --at (its keyframe, or a replay from the keyframe
    before) and train on to the spec's last step with the intervention, deterministically, into
    a new run of the store: SIZE/seedK/branches/NAME. Its checkpoints before the fork are the
    parent's (read through it, not copied); it stores its provenance (parent, fork step, the
    intervention as JSON and its SHA-256). Interventions: ablate (zero or mean) or freeze heads
    L.H while training; drop corpus windows (a predicate over a window's tokens, or a list);
    re-draw the data order (--data-seed); another learning-rate schedule. Dropped windows are
    skipped in the parent's data order from the fork on. A branch can be branched (--run
    SIZE/seedK/branches/NAME, at or after its fork): the new branch keeps its parent's
    interventions. Several --run train one after another, or in parallel with --workers or
    --scheduler, bit-identical either way.
    """
    from observatory.spec import load_run_spec

    spec = load_run_spec(args.spec)
    options = _same_names(args, "runs", "store", "resume", "progress", "stop_after", "at", "name")
    with _training_client(args, spec.train.threads) as client:
        from observatory.train import Intervention, train_branches

        intervention = Intervention(
            drop_windows=args.drop_windows or (),
            drop_predicate=args.drop,
            data_seed=args.data_seed,
            lr=args.lr,
            schedule=args.schedule,
            warmup_steps=args.warmup_steps,
            ablate_heads=args.ablate_head,
            ablation=args.ablation,
            freeze_heads=args.freeze_head,
        )
        train_branches(
            spec, intervention=intervention, **options, on_run_end=_print_run_summary, client=client
        )


def _quietly(function, *args) -> None:
    """``function(*args)`` in a thread; what it raises, the main thread meets again itself."""
    with contextlib.suppress(Exception):
        function(*args)


def _print_run_summary(summary) -> None:
    from observatory.analysis.phase import FINAL_LOSS

    if not summary.steps:
        print(f"{summary.run}: already trained")
        return
    print(
        f"{summary.run}: {summary.steps} steps in {summary.seconds:.1f} s "
        f"({summary.steps / summary.seconds:.1f} steps/s), {summary.checkpoints} checkpoints "
        f"committed (writer busy {summary.writer_seconds:.1f} s), final loss "
        f"{summary.final_loss:.4f} ({FINAL_LOSS}"
        f"{'' if summary.complete else '; run incomplete, continue with --resume'})"
    )


def _cmd_inspect(args: argparse.Namespace) -> None:
    """Show a store's runs, seeds, checkpoints, tokens seen and disk use.

    Summarise a family store: the family and its corpus, then one line per run with its init
    and data seeds, whether it is complete, its committed checkpoints and their steps, the
    tokens seen at the last checkpoint, its size on disk and its stored results (analyses,
    attributions, training dynamics). Reads metadata only, so it is quick and safe while
    training is running.
    """
    from observatory.query import describe

    print(describe(args.store))


def _cmd_analyses(args: argparse.Namespace) -> None:
    """List the built-in analyses, their variables and options.

    List the built-in analyses: what each computes, the variables it stores (dims after seed
    and step) and its options (the job file's [<name>] table).
    """
    from observatory.jobs.compute import describe_analyses

    print(describe_analyses())


def _analyze_parser(commands, options: _Options) -> None:
    parents = (options.spec_store, options.dask, options.progress)
    analyze = _command(commands, "analyze", _cmd_analyze, *parents)
    analyze.add_argument("spec", help="analysis job spec (analyses/*.toml)")
    analyze.add_argument(
        "--recompute", action="store_true", help="replace existing results instead of skipping"
    )


def _cmd_analyze(args: argparse.Namespace) -> None:
    """Run an analysis job over every checkpoint and seed, on dask.distributed.

    Run the job's analyses (built-in ones, see `observatory analyses`, or your own:
    'package.module:name' or 'file.py:name' beside the job file) on every selected checkpoint of
    every selected run on a dask cluster (default: a local one of the job's execution.workers,
    or one single-threaded worker per core), and write the results into the store. Checkpoints
    already analysed with the same parameters (and the same source code) are skipped; only
    committed checkpoints are used, so this works while training is still running.
    """
    import dataclasses

    from observatory.jobs.analyze import run_analysis
    from observatory.jobs.job_spec import load_analysis_spec

    spec = load_analysis_spec(args.spec)
    if args.store:
        spec = dataclasses.replace(spec, store=args.store)
    if args.workers:
        execution = dataclasses.replace(spec.execution, workers=args.workers)
        spec = dataclasses.replace(spec, execution=execution)
    report = run_analysis(spec, **_same_names(args, "scheduler", "recompute", "progress"))
    print(
        f"analysed {report.computed} checkpoints of {len(report.runs)} runs "
        f"({report.skipped} already done) into {spec.store}"
    )


def _report_parser(commands, options: _Options) -> None:
    parents = (options.store, options.out_dir, options.selection)
    report = _command(commands, "report", _cmd_report, *parents)
    report.add_argument(
        "--include-incomplete",
        action="store_true",
        help="keep incomplete runs in the across-seed statistics (default: left out, marked)",
    )
    report.add_argument(
        "--transformer-lens",
        action="store_true",
        help="also draw the induction scores in TransformerLens's detect_head convention "
        "(needs head_scores results with tl_* scores)",
    )
    report.add_argument(
        "--figures",
        nargs="+",
        default=(),
        metavar="FILE.py",
        help="Python files whose @observatory.report.figure functions are drawn after the "
        "built-in figures",
    )


def _cmd_report(args: argparse.Namespace) -> None:
    """Write figures, an HTML page and summary tables of an analysed store.

    Summarise circuit formation in an analysed store (run `observatory analyze` first): per
    seed, the induction heads, the emergence step of the best one, the loss bump and the ICL
    score either side of it; across seeds, mean, std and a t-interval (BCa bootstrap from 10
    seeds), with the seeds left out and why (incomplete, not analysed, not formed, no bump).
    Writes PNG figures (training and held-out loss, induction and copying score of every head,
    emergence, ICL score, loss by position, per-token-loss PCA, previous-token heads, heads
    matched across seeds), one self-contained HTML page (report.html), an interactive one
    (report_interactive.html, plotly, works offline) and summary.csv /
    summary_across_seeds.csv / summary.json. Where the runs hold attributions (`observatory
    attribute`), an Attribution section draws each one's terms against the measured target and
    tables its top training windows (attribution*.csv); without any, it gives the command for
    the best induction head across the loss bump. Several sizes get one page with a section per
    size and a comparison.
    """
    from observatory.report import write_report

    options = _same_names(
        args, "sizes", "seeds", "include_incomplete", "transformer_lens", "figures"
    )
    files = write_report(args.store, args.out, **options)
    _print_paths(f"wrote {len(files)} files into {args.out}:", files)


def _verify_parser(commands, options: _Options) -> None:
    parents = (options.store, options.selection, options.dask, options.progress)
    verify = _command(commands, "verify", _cmd_verify, *parents)
    verify.add_argument("--quick", action="store_true", help="checksums and ledger only")


def _cmd_verify(args: argparse.Namespace) -> int:
    """Prove a store holds the checkpoints it claims: checksums, ledger, replay.

    Verify every run of a store and print a table (run, checkpoints checked, checkpoints
    replayed, result): (1) every chunk's checksum; (2) every checkpoint against the SHA-256
    recorded when it was written, no two steps with identical weights, and steps, tokens seen,
    learning rates and batches as the spec prescribes; (3) unless --quick, every checkpoint
    bit-identical to a replay of the steps from the keyframe before it, on dask (default: a
    local cluster of one worker per the spec's torch threads cores, since replay runs with the
    threads each run was trained with). Reads committed data only and writes nothing. Exit
    code 0: all verified; 1: a check failed (the first failing run and step is named); 2: bad
    input.
    """
    from observatory.jobs.verify import format_verdicts, verify_store

    options = _same_names(args, "quick", "sizes", "seeds", "scheduler", "workers", "progress")
    verdicts = verify_store(args.store, **options)
    print(format_verdicts(verdicts))
    failed = [v for v in verdicts if v.failure]
    if failed:
        print(f"verification failed: {failed[0].failure}")
        return 1
    checks = "checksums and ledger" if args.quick else "checksums, ledger and replay"
    print(f"verified {len(verdicts)} runs ({checks}): all checkpoints are the right ones")
    return 0


def _transitions_parser(commands, options: _Options) -> None:
    from observatory.analysis.transitions import TransitionOptions

    parents = (options.store, options.selection)
    transitions = _command(commands, "transitions", _cmd_transitions, *parents)
    transitions.add_argument("--out", metavar="DIR", help="also write transitions.csv/.json")
    defaults = TransitionOptions()
    for name, kind, text in (
        ("min_gain", float, "nats a token's loss must fall to count as learned"),
        ("min_drop", float, "nats a group's mean loss must drop across its window"),
        ("min_tokens", _positive_int, "the smallest group of tokens"),
        ("min_overlap", float, "Jaccard overlap of the tokens of transitions matched"),
    ):
        transitions.add_argument(
            f"--{name.replace('_', '-')}",
            type=kind,
            default=getattr(defaults, name),
            help=f"{text} (default {getattr(defaults, name)})",
        )


def _cmd_transitions(args: argparse.Namespace) -> None:
    """Find every developmental transition of an analysed family, matched across seeds.

    A transition is a group of held-out tokens learned at the same time whose mean loss drops
    abruptly: each token's learning time is the step halfway from its first to its final loss
    (per_token_loss results: run `observatory analyze` first); the learning times of each seed
    are grouped by a Gaussian mixture (components by BIC) over log step, and a group is a
    transition when the loss-bump change-point rule finds a steep drop in its mean loss.
    Transitions of different seeds are matched by the overlap of their tokens. Prints, per
    transition, the seeds it occurs in (universal: every seed), its window per seed with a
    t-interval across seeds, the loss drop, the number of tokens, the heads whose scores change
    in the window and example tokens in context; --out writes transitions.csv and .json.
    """
    from pathlib import Path

    from observatory.report.transitions import (
        TransitionOptions,
        format_transitions,
        transitions,
        write_transitions,
    )
    from observatory.store import FamilyStore

    options = TransitionOptions(
        **_same_names(args, "min_gain", "min_drop", "min_tokens", "min_overlap")
    )
    sizes = args.sizes or FamilyStore(args.store).sizes()
    for size in sizes:
        table = transitions(args.store, size=size, seeds=args.seeds, options=options)
        print(f"size {size}:")
        print(format_transitions(table))
        if args.out:
            where = Path(args.out) / size if len(sizes) > 1 else Path(args.out)
            _print_paths("wrote:", write_transitions(table, where))


def _attribute_parser(commands, options: _Options) -> None:
    parents = (options.store, options.span, options.dask)
    attribute = _command(commands, "attribute", _cmd_attribute, *parents)
    attribute.add_argument(
        "--target",
        required=True,
        metavar="NAME",
        help="induction_score, previous_token_score, probe_repeated_loss, held_out_loss, "
        "'file.py:name' or 'package.module:name'",
    )
    attribute.add_argument(
        "--option",
        dest="options",
        action="append",
        type=_option,
        default=[],
        metavar="KEY=VALUE",
        help='a target option, e.g. layer=1 (repeatable; values are TOML: 2, 0.5, "text")',
    )
    attribute.add_argument(
        "--per-example", action="store_true", help="also split each step over its batch's windows"
    )
    attribute.add_argument("--name", help="stored under attribution/NAME (default: the target)")


def _cmd_attribute(args: argparse.Namespace) -> None:
    """Attribute a target's change over training steps to each update (exact replay).

    Replay the run's steps [--start, --stop) exactly and split the change of a differentiable
    target (a head's induction or previous-token score, the loss on the probe's repeated part,
    the held-out loss, or your own @obs.target in 'file.py:name') into one term per update:
    the target's gradient averaged at both ends of the step (trapezoid rule) dotted with the
    step's weight change. Prints the largest step contributions, their sum, the measured change
    and the residual; with --per-example each step's term is also split over its batch's
    training windows (per-example gradients through the step's AdamW preconditioner). The result
    is stored in the run as attribution/NAME (read it with obs.attribution). Keyframe segments
    of the span run as dask tasks with --workers or --scheduler.
    With --branch NAME the branch is replayed, its intervention acting from its fork on (steps
    before the fork through its parent), and the result is stored in the branch.
    """
    from observatory.attribution import attribute, format_attribution

    att = attribute(
        args.store,
        options=dict(args.options),
        **_same_names(args, "size", "seed", "start", "stop", "target", "per_example", "name"),
        branch=args.branch,
        workers=args.workers or 0,
        scheduler=args.scheduler,
    )
    print(format_attribution(att))
    print(f"stored as {att.attrs['run']}/attribution/{att.attrs['name']}")


def _dynamics_parser(commands, options: _Options) -> None:
    parents = (options.store, options.span, options.dask)
    dynamics = _command(commands, "dynamics", _cmd_dynamics, *parents)
    dynamics.add_argument("--name", help="stored under dynamics/NAME (default: steps_START_STOP)")


def _cmd_dynamics(args: argparse.Namespace) -> None:
    """Measure what each update moved over training steps, per block and head (exact replay).

    Replay the run's steps [--start, --stop) exactly and measure every update: the norm of the
    training gradient it used (before clipping) and its clip factor, the update-to-weight ratio
    |w(k+1) - w(k)| / |w(k)|, and the cosine between consecutive updates, for the whole model,
    for each parameter block (each layer's own) and, but for the cosine, for each attention
    head. Prints the whole model's figures, each block's median and largest update ratio and
    the heads that moved most. The result is stored in the run as dynamics/NAME (read it with
    obs.dynamics). Keyframe segments of the span run as dask tasks with --workers or
    --scheduler.
    With --branch NAME the branch is replayed, its intervention acting from its fork on (steps
    before the fork through its parent), and the result is stored in the branch.
    """
    from observatory.attribution.dynamics import format_dynamics, measure_dynamics

    ds = measure_dynamics(
        args.store,
        **_same_names(args, "size", "seed", "start", "stop", "name", "branch"),
        workers=args.workers or 0,
        scheduler=args.scheduler,
    )
    print(format_dynamics(ds))
    print(f"stored as {ds.attrs['run']}/dynamics/{ds.attrs['name']}")


def _export_parser(commands, options: _Options) -> None:
    export = _command(commands, "export", _cmd_export, options.store, options.out_dir)
    export.add_argument("--size", help="size name (default: the store's only size)")
    which = export.add_mutually_exclusive_group()
    which.add_argument("--seed", type=int, help="one seed index, written straight into --out")
    _add_seeds(which)
    which.add_argument(
        "--run",
        type=_run_path,
        metavar="RUN",
        help="one run or branch, written straight into --out: l2-d64/seed0 or "
        "l2-d64/seed0/branches/NAME (its size is the one in RUN)",
    )
    export.add_argument(
        "--steps",
        type=_int_list("steps", "0,512,1000 or 0-1000"),
        help="checkpoint steps, e.g. 0,512,1000 (default: all)",
    )


def _cmd_export(args: argparse.Namespace) -> None:
    """Write checkpoints as per-step Hugging Face folders (step<N>/), with provenance.

    Export runs as the revision layout of published suites: one folder per checkpoint,
    step<N>/ with config.json and model.safetensors (float32), plus per run observatory.json
    (spec, seeds, corpus fingerprint, versions), metrics.csv (loss, lr, grad norm per step) and
    data_order.csv (the corpus index of every sequence of every step up to the last exported
    checkpoint). With --seed the run's folders go straight into --out; otherwise each run gets
    --out/seed<k>/. A branch is exported as a run with --run SIZE/seedK/branches/NAME: its
    checkpoints before the fork are its parent's, and observatory.json holds its provenance
    (parent, fork step, intervention and its SHA-256, the branches up to the run).
    """
    from observatory.interop.hf import export

    targets = export(
        args.store,
        args.out,
        size=args.size,
        seeds=[args.seed] if args.seed is not None else args.seeds,
        steps=args.steps,
        per_seed_folders=args.seed is None,
        run=args.run,
    )
    _print_paths(f"exported {len(targets)} run{'s' * (len(targets) != 1)}:", targets)


def _ingest_parser(commands, options: _Options) -> None:
    ingest = _command(commands, "ingest", _cmd_ingest, options.progress)
    ingest.add_argument("dirs", nargs="+", metavar="DIR", help="checkpoint directory per run")
    ingest.add_argument("--out", required=True, metavar="STORE", help="the new store (*.zarr)")
    ingest.add_argument(
        "--name", help="family name (default: the store's file name; not for an export)"
    )
    ingest.add_argument(
        "--size", help="size name (default: l<layers>-d<d_model>; not for an export)"
    )
    ingest.add_argument(
        "--context",
        type=int,
        help="tokens per probe/held-out sequence of the analyses (default: n_positions; "
        "not for an export, which keeps its own)",
    )
    ingest.add_argument(
        "--batch-size",
        type=int,
        help="sequences per training step of the original run, for tokens seen (default: 1; "
        "not for an export, which keeps its own)",
    )


def _cmd_ingest(args: argparse.Namespace) -> None:
    """Make a store from directories of Hugging Face checkpoint folders.

    Ingest series of Hugging Face checkpoints (GPT-NeoX, i.e. Pythia's architecture, or the
    attention-only model) into a new store, one directory per run: folders named step<N> or
    checkpoint-<N>, or a .json/.csv file mapping steps to folders. Several directories become
    seeds of one family. Exports keep their spec, seeds and metrics. Ingested runs have no
    optimizer state or data order, so batch_at and resuming refuse; every query, analysis and
    report works.
    """
    from observatory.interop.hf import ingest
    from observatory.query import describe

    options = _same_names(args, "name", "size", "context", "batch_size", "progress")
    path = ingest(args.dirs, args.out, **options)
    print(describe(path))


# --------------------------------------------------------------------------------------------
# Argument types and output.


def _int_list(noun: str, example: str) -> Callable[[str], list[int]]:
    """A parser of ``"0-2"``, ``"0,3"`` or ``"1"`` into a list of ints (each range ascending);
    its errors say what the option takes (argparse names the option)."""

    def parse(text: str) -> list[int]:
        out: list[int] = []
        for part in text.split(","):
            lo, dash, hi = part.partition("-")
            if not _DIGITS.fullmatch(lo) or (dash and not _DIGITS.fullmatch(hi)):
                raise argparse.ArgumentTypeError(f"expected {noun} like {example}, got {text!r}")
            if dash and int(hi) < int(lo):
                raise argparse.ArgumentTypeError(f"the range {part!r} is empty (write {hi}-{lo})")
            part_values = range(int(lo), int(hi) + 1) if dash else [int(lo)]
            if len(out) + len(part_values) > MAX_LIST:
                raise argparse.ArgumentTypeError(f"more than {MAX_LIST} {noun} in {text!r}")
            out.extend(part_values)
        return out

    return parse


def _run_path(text: str) -> str:
    """``text`` if it is a run's path like ``l2-d64/seed0`` or ``l2-d64/seed0/branches/a``."""
    from observatory.errors import SpecError
    from observatory.spec import parse_run_path

    try:
        parse_run_path(text)
    except SpecError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _head(text: str) -> tuple[int, int]:
    """Parse ``"0.3"`` (layer 0, head 3) into ``(0, 3)``."""
    layer, dot, head = text.partition(".")
    if not (dot and _DIGITS.fullmatch(layer) and _DIGITS.fullmatch(head)):
        raise argparse.ArgumentTypeError(f"expected a head like 0.3 (layer.head), got {text!r}")
    return int(layer), int(head)


def _index_file(path: str) -> list[int]:
    """The corpus indices listed in a text file (separated by whitespace or commas)."""
    try:
        with open(path) as file:
            words = file.read().replace(",", " ").split()
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {err.strerror}") from None
    bad = next((word for word in words if not _DIGITS.fullmatch(word)), None)
    if bad is not None:
        raise argparse.ArgumentTypeError(f"{path}: {bad!r} is not a corpus index")
    return [int(word) for word in words]


def _option(text: str) -> tuple[str, object]:
    """Parse ``key=value`` (the value as TOML, else as a string) into a pair."""
    import tomllib

    key, equals, value = text.partition("=")
    if not equals or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE like layer=1, got {text!r}")
    try:
        parsed = tomllib.loads(f"value = {value}")["value"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


def _names(text: str) -> list[str]:
    """Parse ``"l2-d64,l4-d128"`` into a list of names."""
    names = text.split(",")
    if not all(name.strip() for name in names):
        raise argparse.ArgumentTypeError(f"expected size names like l2-d64,l4-d128, got {text!r}")
    return names


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _same_names(args: argparse.Namespace, *names: str) -> dict:
    """The named options as keyword arguments of the library function that has the same names."""
    return {name: getattr(args, name) for name in names}


def _print_paths(title: str, paths) -> None:
    print(title)
    for path in paths:
        print(f"  {path}")


def _fail(message: str) -> int:
    print(
        f"observatory: error: {message.splitlines()[0] if message else 'failed'}", file=sys.stderr
    )
    return 2


def _internal_error() -> int:
    """Write the traceback to a log file and print one line saying where it is."""
    text = traceback.format_exc()
    last = text.rstrip().splitlines()[-1]
    handle, log = tempfile.mkstemp(prefix="observatory-error-", suffix=".log")
    with os.fdopen(handle, "w") as file:
        file.write(text)
    print(
        f"observatory: internal error: {last} (traceback in {log}; "
        "OBSERVATORY_DEBUG=1 shows it here)",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
