"""`fedcl compare`: runs side by side, as a table (Markdown and CSV) and one accuracy plot.

Each argument is a run folder (plain values) or the parent folder of a multi-seed run
(mean ± std over its seeds, from its summary.json). Metric names are read from the summaries,
not fixed here: any scalar of summary.json can be a column (`--metrics`).
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcl.errors import FedclError
from fedcl.reports.figures import avg_acc_series, compare_figure
from fedcl.reports.runfolder import (
    dotted,
    is_seeds_parent,
    read_run,
    read_seeds_summary,
    scalar_metrics,
    short_strategy,
)
from fedcl.reports.seeds import seeds_summary
from fedcl.reports.text import fmt, show

MARKDOWN, CSV, PLOT = "compare.md", "compare.csv", "avg_acc.png"


@dataclass
class Stat:
    """One metric of one compared entry: the value (mean over seeds), its sample std (None for
    a single run or one seed) and the number of runs it averages."""

    mean: float
    std: float | None = None
    n: int = 1


@dataclass
class Entry:
    """A compared run or multi-seed parent: its folder, label, metrics, one config (the first
    seed's for a parent), and per run its average accuracy by round."""

    path: Path
    label: str
    strategy: str
    metrics: dict[str, Stat]
    config: dict[str, Any]
    curves: list[dict[int, float]] = field(default_factory=list)
    seeds: list[int] | None = None  # None: a single run
    status: str = "completed"

    @property
    def runs(self) -> int:
        """How many runs the entry's values come from."""
        return len(self.curves) if self.seeds is not None else 1


@dataclass
class Comparison:
    """What `compare` wrote: the folder, the Markdown table (as printed), and the file paths."""

    out_dir: Path
    markdown: str
    files: list[Path]


def load_entry(path: str | Path) -> Entry:
    """Read a run folder or a multi-seed parent for comparison; a one-line `FedclError` for a
    folder that is neither, or a run without summary.json (interrupted)."""
    path = Path(path)
    if is_seeds_parent(path):
        return _load_parent(path, read_seeds_summary(path))
    seed_runs = _seed_runs(path)
    if seed_runs:  # seeds run one by one (or `--seeds` cut short): aggregated as `--seeds` does
        return _load_parent(path, _summary_of(seed_runs))
    run = read_run(path)
    if run.summary is None:
        raise FedclError(
            f"{path} has no summary.json: the run was interrupted; continue it "
            f"(fedcl run --resume {path}) or see what it did (fedcl report {path})"
        )
    metrics = {k: Stat(v) for k, v in scalar_metrics(run.summary).items()}
    status = str(run.summary.get("status", "completed"))
    return Entry(
        path, "", run.strategy, metrics, run.config, [avg_acc_series(run.records)], status=status
    )


def _seed_runs(path: Path) -> dict[int, Path]:
    """The ``seed_<n>`` run folders in `path`, by seed, when `path` is not a run itself."""
    if not path.is_dir() or (path / "config.yaml").exists():
        return {}
    found = {}
    for folder in path.glob("seed_*/"):
        suffix = folder.name.removeprefix("seed_")
        if suffix.isdigit():
            found[int(suffix)] = folder
    return dict(sorted(found.items()))


def _summary_of(seed_runs: dict[int, Path]) -> dict[str, Any]:
    """The multi-seed summary `fedcl run --seeds` would have written for these finished runs;
    a one-line `FedclError` if one of them has not finished."""
    summaries, failed = {}, {}
    for seed, folder in seed_runs.items():
        summary = read_run(folder).summary
        if summary is None:
            raise FedclError(
                f"{folder} has no summary.json: the run was interrupted; finish it "
                f"(fedcl run --resume {folder}) or compare the finished seeds one by one"
            )
        if summary.get("status") == "failed":
            failed[seed] = str(summary.get("error", "failed"))
        else:
            summaries[seed] = summary
    return seeds_summary(list(seed_runs), summaries, failed)


def _load_parent(path: Path, summary: dict[str, Any]) -> Entry:
    metrics = {
        name: Stat(float(m["mean"]), m.get("std"), int(m.get("n", 1)))
        for name, m in (summary.get("metrics") or {}).items()
        if m.get("mean") is not None
    }
    runs = summary.get("runs") or {}
    curves, config = [], None
    for seed in summary.get("completed") or []:
        folder = path / runs.get(str(seed), f"seed_{seed}")
        run = read_run(folder)
        curves.append(avg_acc_series(run.records))
        config = config if config is not None else run.config
    strategy = summary.get("strategy")
    name = short_strategy(strategy) if isinstance(strategy, str) else ""
    status = str(summary.get("status"))
    if summary.get("failed"):
        status += f": seed {', '.join(summary['failed'])} failed"
    return Entry(
        path,
        "",
        name,
        metrics,
        config or {},
        curves,
        seeds=list(summary.get("seeds") or []),
        status=status,
    )


def label_entries(entries: Sequence[Entry], labels: Sequence[str] | None = None) -> None:
    """Name each entry: `labels` if given (one per entry), else its strategy's short name, else
    (when two entries share a strategy) its folder's name, made unique by a number if needed."""
    if labels is not None:
        if len(labels) != len(entries):
            raise FedclError(
                f"--labels gives {len(labels)} label(s) for {len(entries)} run(s); "
                "give one per run, comma-separated"
            )
        names = list(labels)
    else:
        names = [e.strategy for e in entries]
        if len(set(names)) < len(names) or not all(names):
            names = [e.path.name for e in entries]
    seen: dict[str, int] = {}
    for entry, name in zip(entries, names, strict=True):
        seen[name] = seen.get(name, 0) + 1
        entry.label = name if names.count(name) == 1 else f"{name} ({seen[name]})"


def choose_metrics(
    entries: Sequence[Entry], requested: Sequence[str] | None, default: Sequence[str]
) -> list[str]:
    """The table's metric columns: `requested` (each must be a scalar of some entry's summary),
    else the names of `default` that some entry holds, else every scalar they hold."""
    available = sorted({name for e in entries for name in e.metrics})
    if requested:
        unknown = [m for m in requested if m not in available]
        if unknown:
            raise FedclError(
                f"unknown metric '{unknown[0]}' in these runs' summaries; "
                f"valid: {', '.join(available)}"
            )
        return list(requested)
    return [m for m in default if m in available] or available


def _setting(entry: Entry, key: str) -> Any:
    if key == "seed" and entry.seeds is not None:
        return entry.seeds
    try:
        return dotted(entry.config, key)
    except KeyError:
        return None


def check_settings(entries: Sequence[Entry], settings: Sequence[str]) -> None:
    """Raise a one-line `FedclError` for a `--settings` key in none of the runs' config.yaml."""
    for key in settings:
        if all(_setting(e, key) is None for e in entries):
            raise FedclError(
                f"unknown config key '{key}' in these runs' config.yaml (dotted, e.g. train.lr)"
            )


def cell(stat: Stat | None, runs: int) -> str:
    """``mean ± std`` (``(n=k)`` added when fewer than the entry's runs hold the metric), or
    the plain value of a single run; ``-`` when absent."""
    if stat is None:
        return "-"
    text = fmt(stat.mean)
    if stat.std is not None:
        text += f" ± {fmt(stat.std)}"
    if runs > 1 and stat.n != runs:
        text += f" (n={stat.n})"
    return text


def markdown_table(
    entries: Sequence[Entry], metrics: Sequence[str], settings: Sequence[str]
) -> str:
    """The comparison as a Markdown table, a row per entry: label, runs (seeds), each setting,
    each metric."""
    header = ["run", "runs", *settings, *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in entries:
        label = e.label if e.status == "completed" else f"{e.label} ({e.status})"
        row = [label, str(e.runs), *(show(_setting(e, k)) for k in settings)]
        row += [cell(e.metrics.get(m), e.runs) for m in metrics]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines) + "\n"


def csv_table(entries: Sequence[Entry], metrics: Sequence[str], settings: Sequence[str]) -> str:
    """The comparison as CSV: label, path, status, runs, each setting, and per metric its mean
    (column ``<metric>``, the summary's own value for a single run) and ``<metric>_std``; full
    precision, empty where absent."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["run", "path", "status", "runs", *settings]
    header += [c for m in metrics for c in (m, f"{m}_std")]
    writer.writerow(header)
    for e in entries:
        row: list[Any] = [e.label, str(e.path), e.status, e.runs]
        row += [show(_setting(e, k)) if _setting(e, k) is not None else "" for k in settings]
        for m in metrics:
            stat = e.metrics.get(m)
            row += ["", ""] if stat is None else [repr(stat.mean), _repr(stat.std)]
        writer.writerow(row)
    return buffer.getvalue()


def _repr(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def default_out_dir() -> Path:
    """runs/compare-<YYYYmmdd-HHMMSS> under the working directory."""
    return Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"


def compare(
    paths: Sequence[str | Path],
    out: str | Path | None = None,
    *,
    metrics: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    settings: Sequence[str] = (),
    default_metrics: Sequence[str] = ("acc",),
) -> Comparison:
    """Put the runs or multi-seed parents `paths` side by side.

    Writes into `out` (default ``runs/compare-<time>``): ``compare.md`` (the table, mean ± std
    for multi-seed parents), ``compare.csv`` (the same, full precision, means and stds in their
    own columns) and ``avg_acc.png`` (average accuracy over rounds per entry, a ± 1 std band
    across seeds). Columns: `settings` (dotted config keys, read from the runs' config.yaml),
    then `metrics` (scalar names of summary.json; default: the names of `default_metrics` the
    runs hold). Every input is read and checked before anything is written: a bad path, metric,
    setting or label count raises a one-line `FedclError`.
    """
    if not paths:
        raise FedclError("fedcl compare needs at least one run folder or multi-seed parent")
    entries = [load_entry(p) for p in paths]
    label_entries(entries, labels)
    columns = choose_metrics(entries, metrics, default_metrics)
    check_settings(entries, settings)
    out_dir = Path(out) if out is not None else default_out_dir()
    if out_dir.exists() and not out_dir.is_dir():
        raise FedclError(f"{out_dir} is a file, not a folder; choose another --out folder")
    markdown = markdown_table(entries, columns, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / MARKDOWN, out_dir / CSV, out_dir / PLOT]
    files[0].write_text(markdown, encoding="utf-8")
    files[1].write_text(csv_table(entries, columns, settings), encoding="utf-8")
    files[2].write_bytes(compare_figure([(e.label, e.curves) for e in entries]))
    return Comparison(out_dir, markdown, files)
