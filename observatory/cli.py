"""The ``observatory`` command: a thin layer over the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from observatory.errors import ObservatoryError

DESCRIPTION = """\
Observatory: train seeded model families with dense checkpoints and a recorded data order
into one zarr store, query them lazily with xarray, and track circuit formation across
checkpoints and seeds.

typical session:
  observatory train runs/induction.toml              # every size x seed of the family
  observatory inspect store/induction.zarr           # runs, checkpoints, tokens, disk use
  observatory analyses                               # the built-in analyses and options
  observatory analyze analyses/induction.toml        # circuit-formation scores, on dask
  observatory report store/induction.zarr --out report/   # figures, HTML page, summary table
  observatory verify store/induction.zarr            # checksums, ledger, replay of every step
"""


def _int_list(text: str) -> list[int]:
    """Parse ``"0-2"``, ``"0,3"`` or ``"1"`` into a list of ints."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like 0-2 or 0,3, got {text!r}") from None
    return out


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _cmd_train(args: argparse.Namespace) -> None:
    from observatory.spec import load_run_spec
    from observatory.trainer import train_family

    spec = load_run_spec(args.spec)
    path = train_family(
        spec,
        store=args.store,
        seeds=args.seeds,
        sizes=args.sizes.split(",") if args.sizes else None,
        resume=args.resume,
        progress=not args.no_progress,
        stop_after=args.stop_after,
        on_run_end=_print_run_summary,
        workers=args.workers,
        scheduler=args.scheduler,
    )
    print(f"trained into {path}")


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


def _cmd_analyze(args: argparse.Namespace) -> None:
    import dataclasses

    from observatory.jobs import load_analysis_spec, run_analysis

    spec = load_analysis_spec(args.spec)
    if args.store:
        spec = dataclasses.replace(spec, store=args.store)
    report = run_analysis(
        spec, scheduler=args.scheduler, recompute=args.recompute, progress=not args.no_progress
    )
    print(
        f"analysed {report.computed} checkpoints of {len(report.runs)} runs "
        f"({report.skipped} already done) into {spec.store}"
    )


def _cmd_verify(args: argparse.Namespace) -> int:
    from observatory.verify import format_verdicts, verify_store

    verdicts = verify_store(
        args.store,
        quick=args.quick,
        sizes=args.sizes.split(",") if args.sizes else None,
        seeds=args.seeds,
        scheduler=args.scheduler,
        workers=args.workers,
        progress=not args.no_progress,
    )
    print(format_verdicts(verdicts))
    failed = [v for v in verdicts if v.failure]
    if failed:
        print(f"verification failed: {failed[0].failure}")
        return 1
    checks = "checksums and ledger" if args.quick else "checksums, ledger and replay"
    print(f"verified {len(verdicts)} runs ({checks}): all checkpoints are the right ones")
    return 0


def _cmd_analyses(args: argparse.Namespace) -> None:
    from observatory.jobs import describe_analyses

    print(describe_analyses())


def _cmd_inspect(args: argparse.Namespace) -> None:
    from observatory.query import describe

    print(describe(args.store))


def _cmd_report(args: argparse.Namespace) -> None:
    from observatory.report import write_report

    files = write_report(
        args.store,
        args.out,
        sizes=args.sizes.split(",") if args.sizes else None,
        seeds=args.seeds,
        include_incomplete=args.include_incomplete,
        transformer_lens=args.transformer_lens,
    )
    print(f"wrote {len(files)} files into {args.out}:")
    for path in files:
        print(f"  {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="observatory",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a model family from a run spec",
        description="Train every size x seed of a run spec into one zarr store: dense "
        "checkpoints (weights, AdamW state, RNG state), per-step loss/lr/grad-norm and the "
        "corpus indices of every batch. Deterministic: the same spec gives the same weights.",
    )
    train.add_argument("spec", help="run spec (runs/*.toml)")
    train.add_argument("--store", help="store path (default: the spec's store_path)")
    train.add_argument("--seeds", type=_int_list, help="seed indices to train, e.g. 0-1 or 0,2")
    train.add_argument("--sizes", help="comma-separated size names to train (default: all)")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue unfinished runs from their last committed checkpoint; skip finished ones",
    )
    train.add_argument(
        "--stop-after",
        type=int,
        metavar="N",
        help="stop each run after N steps in this call (continue later with --resume)",
    )
    cluster = train.add_mutually_exclusive_group()
    cluster.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="train runs in parallel on a local dask cluster of N single-threaded worker "
        "processes (each run uses the spec's torch threads)",
    )
    cluster.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="train runs as tasks on a running dask cluster, e.g. tcp://host:8786 "
        "(dask-jobqueue on Slurm, ...); every worker must reach the store",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(func=_cmd_train)

    analyze = commands.add_parser(
        "analyze",
        help="run an analysis job over every checkpoint and seed, on dask.distributed",
        description="Run the job's analyses (built-in ones, see `observatory analyses`, or "
        "your own: 'package.module:name' or 'file.py:name' beside the job file) on every "
        "selected checkpoint of every selected run on a dask cluster, and write the results "
        "into the store. Checkpoints already analysed with the same parameters (and the same "
        "source code) are skipped; only committed checkpoints are used, so this works while "
        "training is still running.",
    )
    analyze.add_argument("spec", help="analysis job spec (analyses/*.toml)")
    analyze.add_argument("--store", help="store to analyse (default: the spec's store)")
    analyze.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="address of a running dask scheduler, e.g. tcp://host:8786 "
        "(default: a local cluster, one single-threaded worker per core)",
    )
    analyze.add_argument(
        "--recompute", action="store_true", help="replace existing results instead of skipping"
    )
    analyze.add_argument("--no-progress", action="store_true", help="no progress bar")
    analyze.set_defaults(func=_cmd_analyze)

    analyses = commands.add_parser(
        "analyses",
        help="list the built-in analyses, their variables and options",
        description="List the built-in analyses: what each computes, the variables it stores "
        "(dims after seed and step) and its options (the job file's [<name>] table).",
    )
    analyses.set_defaults(func=_cmd_analyses)

    inspect = commands.add_parser(
        "inspect",
        help="show a store's runs, seeds, checkpoints, tokens seen and disk use",
        description="Summarise a family store: the family and its corpus, then one line per "
        "run with its init and data seeds, whether it is complete, its committed checkpoints "
        "and their steps, the tokens seen at the last checkpoint, its size on disk and its "
        "analyses. Reads metadata only, so it is quick and safe while training is running.",
    )
    inspect.add_argument("store", help="family store (*.zarr)")
    inspect.set_defaults(func=_cmd_inspect)

    report = commands.add_parser(
        "report",
        help="write figures, an HTML page and summary tables of an analysed store",
        description="Summarise circuit formation in an analysed store (run `observatory "
        "analyze` first): per seed, the induction heads, the emergence step of the best one, "
        "the loss bump and the ICL score either side of it; across seeds, mean, std and a "
        "t-interval (BCa bootstrap from 10 seeds), with the seeds left out and why "
        "(incomplete, not analysed, not formed, no bump). Writes PNG figures (training and "
        "held-out loss, induction and copying score of every head, emergence, ICL score, loss "
        "by position, per-token-loss PCA, previous-token heads, heads matched across seeds), "
        "one self-contained HTML page (report.html), an interactive one (report_interactive"
        ".html, plotly, works offline) and summary.csv / summary_across_seeds.csv / "
        "summary.json.",
    )
    report.add_argument("store", help="family store (*.zarr), analysed")
    report.add_argument(
        "--out", required=True, metavar="DIR", help="directory to write into (created if needed)"
    )
    report.add_argument(
        "--sizes",
        "--size",
        help="comma-separated size names (default: every size; several get one page with a "
        "section per size and a comparison)",
    )
    report.add_argument("--seeds", type=_int_list, help="seed indices to report, e.g. 0-1 or 0,2")
    report.add_argument(
        "--include-incomplete",
        action="store_true",
        help="keep incomplete runs in the across-seed statistics (default: left out, marked)",
    )
    report.add_argument(
        "--transformer-lens",
        action="store_true",
        help="also draw the induction scores in TransformerLens's detect_head convention",
    )
    report.set_defaults(func=_cmd_report)

    verify = commands.add_parser(
        "verify",
        help="prove a store holds the checkpoints it claims: checksums, ledger, replay",
        description="Verify every run of a store and print a table (run, checkpoints checked, "
        "checkpoints replayed, result): (1) every chunk's checksum; (2) every checkpoint "
        "against the SHA-256 recorded when it was written, no two steps with identical "
        "weights, and steps, tokens seen, learning rates and batches as the spec prescribes; "
        "(3) unless --quick, every checkpoint bit-identical to a replay of the steps from the "
        "keyframe before it, on dask. Reads committed data only and writes nothing. Exit "
        "code 0: all verified; 1: a check failed (the first failing run and step is named); "
        "2: bad input.",
    )
    verify.add_argument("store", help="family store (*.zarr)")
    verify.add_argument("--quick", action="store_true", help="checksums and ledger only")
    verify.add_argument("--sizes", help="comma-separated size names (default: all)")
    verify.add_argument("--seeds", type=_int_list, help="seed indices, e.g. 0-1 or 0,2")
    verify.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="address of a running dask scheduler (default: a local cluster)",
    )
    verify.add_argument(
        "--workers", type=int, metavar="N", help="local cluster workers (default: one per core)"
    )
    verify.add_argument("--no-progress", action="store_true", help="no progress bar")
    verify.set_defaults(func=_cmd_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; user errors print one line and return a non-zero exit code."""
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except ObservatoryError as err:
        print(f"observatory: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "observatory: interrupted; committed checkpoints are kept (continue with --resume)",
            file=sys.stderr,
        )
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
