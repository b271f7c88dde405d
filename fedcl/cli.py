"""`fedcl run <config.yaml> [key=value ...] [--out DIR]`: argument parsing and messages only."""

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
    run.add_argument("config", help="experiment YAML (see simulations/)")
    run.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. rounds=10")
    run.add_argument("--out", default=None, help="run folder (default: runs/<name>-<time>)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _run(args: argparse.Namespace) -> int:
    # Imported here so `fedcl --help` stays fast (ray and torch take seconds to import).
    from fedcl.api import run

    result = run(args.config, args.overrides, out=args.out, progress=False if args.quiet else None)
    summary = result.summary
    keys = ("acc", "bwt", "forgetting", "rounds", "wall_s", "client_updates_per_s")
    print(json.dumps({k: summary.get(k) for k in keys}))
    print(f"run folder: {result.out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fedcl` console script; user errors print one line and exit 2."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except FedclError as exc:
        print(f"fedcl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedcl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
