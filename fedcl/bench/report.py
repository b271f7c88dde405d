"""From raw row measurements to the benchmark's figures, its JSON file and its text table.

Definitions (the same for every row):

- steady-state seconds per round: the median of the rounds after the first;
- updates/s: clients trained per round (median after the first) / steady-state seconds per round;
- start-up: wall time - rounds x steady-state seconds per round (everything that is not steady
  rounds: Ray and actor start, node registration, first-round warm-up); where fedcl generates the
  data set inside `fedcl.run` (no dataset cache), the bench's own generation time is taken out;
- bytes per round: for fedcl, measured (``bytes_sent`` + ``bytes_received`` of its round records:
  the pickled bytes that crossed between driver and actors, median after the first round); for
  Flower, computed from message sizes, model bytes x clients sampled x 2 (down and up); 0 for
  the in-process loops;
- lean ratio: updates/s / (lean loop updates/s x cores the row used).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

IN_PROCESS = ("lean", "naive")

# (heading, row key, format) of the text table.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("workload", "workload_label", "{}"),
    ("engine", "label", "{}"),
    ("cores", "cores", "{:d}"),
    ("updates/s", "updates_per_s", "{:.0f}"),
    ("s/round", "round_s", "{:.3f}"),
    ("start-up s", "startup_s", "{:.1f}"),
    ("peak MiB", "peak_rss_mib", "{:.0f}"),
    ("MB/round", "mb_per_round", "{:.2f}"),
    ("x lean·cores", "lean_ratio", "{:.3f}"),
    ("vs Flower", "speedup_vs_flower", "{:.1f}x"),
)


def steady(values: Sequence[float]) -> float:
    """The steady-state value: the median after the first entry (the only one if alone)."""
    rest = list(values[1:]) or list(values)
    return float(statistics.median(rest))


def derive_row(
    engine: str, raw: dict[str, Any], per_round: int, generate_s: float = 0.0
) -> dict[str, Any]:
    """The figures of a row of `engine` from its raw measurements (see the module docstring);
    `generate_s` is taken out of a fedcl row's start-up (data generation inside `fedcl.run`)."""
    round_s = steady(raw["round_s"])
    sampled = steady(raw["sampled"])
    rounds = len(raw["round_s"])
    # Clamped at 0: with no start-up to speak of (the loops), noise can make the difference < 0.
    generated = generate_s if engine == "fedcl" else 0.0
    startup = max(0.0, raw["wall_s"] - rounds * round_s - generated)
    moved = 0 if engine in IN_PROCESS else raw["model_bytes"] * per_round * 2
    if raw.get("bytes_moved"):
        moved = steady(raw["bytes_moved"])
    return {
        "round_s": round_s,
        "updates_per_s": sampled / round_s if round_s > 0 else math.inf,
        "startup_s": startup,
        "generate_s_taken_out": generated,
        "bytes_per_round": moved,
        "bytes_measured": bool(raw.get("bytes_moved")),
        "mb_per_round": moved / 1e6,
        "rounds_run": rounds,
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Add `lean_ratio` to every row and `speedup_vs_flower` to fedcl's, per workload."""
    by_workload: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_workload.setdefault(row["workload_label"], []).append(row)
    for group in by_workload.values():
        lean = next((r for r in group if r["engine"] == "lean" and r.get("ok")), None)
        flower = next((r for r in group if r["engine"] == "flower" and r.get("ok")), None)
        for row in group:
            if not row.get("ok"):
                continue
            if lean is not None:
                row["lean_ratio"] = row["updates_per_s"] / (lean["updates_per_s"] * row["cores"])
            if flower is not None and row["engine"] == "fedcl":
                row["speedup_vs_flower"] = flower["round_s"] / row["round_s"]


def machine_info() -> dict[str, Any]:
    """Cores, versions and date of this run."""
    import flwr
    import ray
    import torch

    import fedcl

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "cpu": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": flwr.__version__,
        "ray": ray.__version__,
        "fedcl": fedcl.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def write_json(report: dict[str, Any], path: Path) -> None:
    """Write the report (machine, settings, notes, rows) as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "nan"
    return fmt.format(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table (failed and skipped rows say so)."""
    lines = [[heading for heading, _, _ in COLUMNS]]
    for row in rows:
        if row.get("ok"):
            lines.append([_cell(row, key, fmt) for _, key, fmt in COLUMNS])
        else:
            status = "skipped" if row.get("skipped") else "FAILED"
            lines.append([row["workload_label"], row["label"], status] + [""] * (len(COLUMNS) - 3))
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    text = []
    for number, line in enumerate(lines):
        cells = [
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        text.append("  ".join(cells).rstrip())
        if number == 0:
            text.append("  ".join("-" * width for width in widths))
    return "\n".join(text)
