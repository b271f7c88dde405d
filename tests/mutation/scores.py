"""Per-module score of the last mutation run (`tests/mutation/run.sh`): killed / total, the mutants
left alive, and those no selected test reaches. Reads mutmut's `.meta` files in
`.mutation/mutants/`; run from anywhere: `python tests/mutation/scores.py`."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

MUTANTS = Path(__file__).resolve().parents[2] / ".mutation" / "mutants"


def module_of(meta: Path) -> str:
    """`fedcl.metrics.continual` for `mutants/fedcl/metrics/continual.py.meta`."""
    return ".".join(meta.relative_to(MUTANTS).with_suffix("").with_suffix("").parts)


def main() -> int:
    metas = sorted(MUTANTS.rglob("*.py.meta"))
    if not metas:
        print(f"no mutation run in {MUTANTS} (run tests/mutation/run.sh)", file=sys.stderr)
        return 1
    for meta in metas:
        exit_codes: dict[str, int | None] = json.loads(meta.read_text())["exit_code_by_key"]
        status = {key: status_by_exit_code[code] for key, code in exit_codes.items()}
        counts = Counter(status.values())
        checked = len(status) - counts["not checked"]
        print(
            f"{module_of(meta)}: {counts['killed']} / {checked} killed"
            + "".join(f", {n} {s}" for s, n in sorted(counts.items()) if s != "killed")
        )
        for key in sorted(k for k, s in status.items() if s not in ("killed", "not checked")):
            print(f"    {status[key]}: {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
