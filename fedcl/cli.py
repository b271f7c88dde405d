"""`fedcl run | strategies | bench | compare | report`: argument parsing and messages only."""

from __future__ import annotations

import argparse
import json
import sys

from fedcl.errors import FedclError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedcl", description="Federated continual learning simulations on Ray and Flower."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run an experiment config")
    run.add_argument("config", nargs="?", help="experiment YAML (see simulations/)")
    run.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. rounds=10")
    run.add_argument("--out", default=None, help="run folder (default: runs/<name>-<time>)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue the run in RUN_DIR from its latest good checkpoint (its config.yaml "
        "gives the config); a run that completed is left as it is (exit 0)",
    )
    from fedcl.reports.cli import add_seeds_argument  # light: argparse only

    add_seeds_argument(run)
    strategies = commands.add_parser(
        "strategies", help="list the registered strategies and their arguments"
    )
    strategies.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first (one that registers strategies); repeatable",
    )
    bench = commands.add_parser(
        "bench",
        help="benchmark fedcl against a plain PyTorch loop and Flower's engine, side by side",
    )
    from fedcl.bench.cli import add_arguments  # light: argparse only

    add_arguments(bench)
    from fedcl.reports.cli import add_compare_arguments, add_report_arguments

    add_compare_arguments(
        commands.add_parser("compare", help="put runs or multi-seed runs side by side")
    )
    add_report_arguments(
        commands.add_parser("report", help="write a one-page report.html into a run folder")
    )
    return parser


def _run(args: argparse.Namespace) -> int:
    # Imported here so `fedcl --help` stays fast (ray and torch take seconds to import).
    from fedcl.api import run

    progress = False if args.quiet else None
    if args.seeds is not None:
        from fedcl.reports.cli import run_seeds_from_args

        return run_seeds_from_args(args, progress)
    if args.resume is None and args.config is None:
        raise FedclError("fedcl run needs an experiment config (or --resume RUN_DIR)")
    if args.resume is not None:
        if args.config is not None or args.overrides or args.out is not None:
            raise FedclError(
                "--resume takes the config from RUN_DIR/config.yaml: "
                "give no config, overrides or --out with it"
            )
        from fedcl.engine.checkpoint import finished_summary

        if finished_summary(args.resume) is not None:
            print(f"fedcl: {args.resume} already finished; nothing to resume")
            return 0
    result = run(args.config, *args.overrides, out=args.out, progress=progress, resume=args.resume)
    summary = result.summary
    if summary.get("status") == "failed":
        # One line, as for user errors, but exit 1: the run itself went wrong, not its input.
        print(
            f"fedcl: error: run failed: {summary.get('error', 'see summary.json')}; "
            f"run folder: {result.out_dir}",
            file=sys.stderr,
        )
        return 1
    keys = ("acc", "fgt", "forgetting_max", "rounds", "wall_s", "client_updates_per_s")
    print(json.dumps({k: summary.get(k) for k in keys}))
    print(f"run folder: {result.out_dir}")
    return 0


def _strategies(args: argparse.Namespace) -> int:
    from fedcl.imports import import_modules
    from fedcl.strategies import describe_strategies

    import_modules(args.imports)
    for info in describe_strategies():
        print(f"{info.name}  ({info.target})")
        if info.description:
            print(f"    {info.description}")
        print(f"    arguments: {', '.join(info.arguments) or '-'}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from fedcl.bench.cli import run_from_args

    return run_from_args(args)


def _compare(args: argparse.Namespace) -> int:
    from fedcl.reports.cli import compare_from_args

    return compare_from_args(args)


def _report(args: argparse.Namespace) -> int:
    from fedcl.reports.cli import report_from_args

    return report_from_args(args)


COMMANDS = {
    "run": _run,
    "strategies": _strategies,
    "bench": _bench,
    "compare": _compare,
    "report": _report,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fedcl` console script; user errors print one line and exit 2, a run
    that failed (no client update aggregated in any round: `summary.json` says `status: failed`)
    one line and exit 1; a Ctrl-C, at any moment, stops Ray, prints one line and exits 130."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow options (`fedcl run cfg --quiet rounds=3`).
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and args.command != "run"):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return COMMANDS[args.command](args)
    except FedclError as exc:
        print(f"fedcl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pool = sys.modules.get("fedcl.engine.pool")  # imported before Ray could start
        if pool is not None:
            pool.shutdown_ray()  # before exiting: Ray's exit hook may crash an interrupted driver
        print("fedcl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
