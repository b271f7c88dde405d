"""Methods against the oracle, as a Markdown table: `python -m fedcl.unlearning.table RUN_DIR...`.

One row per run folder (a run with `unlearning.oracle: true`): at the (first) deletion, the
unlearned model's forget / retain / test accuracy and membership-inference AUC with the oracle's
in brackets, the L2 distance to the oracle, the rounds and seconds the method took (as a share
of the oracle's retraining from scratch), and at the end of the run the test accuracy with the
oracle's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

COLUMNS = (
    "method",
    "forget acc",
    "retain acc",
    "test acc",
    "MIA AUC",
    "L2 to oracle",
    "rounds (× oracle)",
    "seconds (× oracle)",
    "final test acc",
)


def row(run_dir: Path) -> list[str]:
    """The table row of one run folder."""
    summary = json.loads((run_dir / "summary.json").read_text())
    first = json.loads((run_dir / "unlearning.jsonl").read_text().splitlines()[0])
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    strategy = (config.get("strategy") or {}).get("name") or ""
    strategy = "" if strategy == "fedavg" else strategy
    mine, oracle, cost = first["unlearned"], first.get("oracle", {}), first["cost"]
    method = first["method"]
    if method == "sharded":
        section = config.get("unlearning") or {}
        method += f" ×{section.get('num_shards')}, {section.get('aggregate')}"

    def pair(key: str) -> str:
        return f"{mine[key]:.3f} ({oracle.get(key, float('nan')):.3f})"

    final: dict[str, Any] = summary["unlearning"].get("final", {})
    return [
        f"{method}{' (' + strategy + ')' if strategy else ''}",
        pair("forget_acc"),
        pair("retain_acc"),
        pair("test_acc"),
        pair("mia_auc"),
        f"{first.get('l2_to_oracle', float('nan')):.3g}",
        f"{cost['rounds']} ({cost.get('rounds_ratio', float('nan')):.2f})",
        f"{cost['seconds']:.2f} ({cost.get('seconds_ratio', float('nan')):.2f})",
        f"{final['unlearned']['test_acc']:.3f} ({final['oracle']['test_acc']:.3f})"
        if final
        else "",
    ]


def table(run_dirs: list[Path]) -> str:
    """The Markdown table of `run_dirs`."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(Path(d))) + " |" for d in run_dirs]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the table of the run folders named in `argv`; a folder that is not a finished run
    with unlearning measures gets one line on stderr and exit code 2."""
    parser = argparse.ArgumentParser(
        prog="python -m fedcl.unlearning.table", description=__doc__.splitlines()[0]
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run folders")
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        missing = [
            name
            for name in ("summary.json", "unlearning.jsonl", "config.yaml")
            if not (run_dir / name).is_file()
        ]
        if missing:
            print(
                f"error: {run_dir} is not a finished run with unlearning measures (no "
                f"{', '.join(missing)})",
                file=sys.stderr,
            )
            return 2
    print(table(args.run_dirs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
