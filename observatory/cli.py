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
    )
    print(f"trained into {path}")


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
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(func=_cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; user errors print one line and return a non-zero exit code."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ObservatoryError as err:
        print(f"observatory: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "observatory: interrupted; committed checkpoints are kept (continue with --resume)",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
