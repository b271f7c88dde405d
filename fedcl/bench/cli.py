"""`fedcl bench`: argument parsing and printing only (the work is in `fedcl.bench.runner`)."""

from __future__ import annotations

import argparse
import sys

# The runner imports ray and torch (seconds): imported in run_from_args, so that building the
# parser for `fedcl --help` stays fast.
ENGINE_NAMES = ("lean", "naive", "fedcl-1", "fedcl", "fedcl-vectorized", "flower")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `fedcl bench` options to `parser`."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny size (20 clients, 5 per round, 3 rounds, one MLP): a smoke test, not a figure",
    )
    parser.add_argument(
        "--out", default="bench.json", help="JSON file to write (default: bench.json)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default 6; 3)")
    parser.add_argument(
        "--engines",
        default=None,
        help=f"comma-separated rows to run (default all): {', '.join(ENGINE_NAMES)}",
    )
    parser.add_argument(
        "--workloads",
        default=None,
        help="comma-separated workloads to run (default all), e.g. 1000-50-mlp128,1000-50-cnn",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of data, model and sampling")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a fedcl config override for every fedcl row (repeatable), e.g. engine.balance=false: "
        "compare a setting side by side with a run without it",
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds allowed per row (default 300; 3600)"
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark `args` describe, print the table; 0 if every row ran, else 1."""
    from fedcl.bench.report import format_table
    from fedcl.bench.runner import run_bench
    from fedcl.errors import ConfigError

    engines = [name.strip() for name in args.engines.split(",")] if args.engines else None
    if args.rounds is not None and args.rounds < 2:
        print("fedcl: error: --rounds must be >= 2 (the first round is warm-up)", file=sys.stderr)
        return 2
    try:
        report = run_bench(
            quick=args.quick,
            rounds=args.rounds,
            engines=engines,
            seed=args.seed,
            out=args.out,
            timeout_s=args.timeout,
            fedcl_overrides=args.set,
            workloads=[name.strip() for name in args.workloads.split(",")]
            if args.workloads
            else None,
        )
    except (ValueError, ConfigError) as exc:
        print(f"fedcl: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(report["rows"]))
    for note in report["notes"]:
        print(f"- {note}")
    print(f"written: {args.out}")
    failed = [row for row in report["rows"] if not row["ok"]]
    for row in failed:
        print(f"{row['workload_label']} {row['label']} failed: {row['error']}", file=sys.stderr)
    return 1 if failed else 0
