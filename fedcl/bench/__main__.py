"""`python -m fedcl.bench [--quick] [--out FILE] ...`: the benchmark without the fedcl CLI."""

from __future__ import annotations

import argparse
import sys

from fedcl.bench.cli import add_arguments, run_from_args


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` and run the benchmark."""
    parser = argparse.ArgumentParser(
        prog="python -m fedcl.bench",
        description="fedcl vs the lean and naive loops and Flower's simulation engine.",
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
