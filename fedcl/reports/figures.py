"""The figures of `fedcl compare` and `fedcl report`, as PNG bytes.

Drawn as `fedcl.metrics.plots` draws a run's own figures (``matplotlib.figure.Figure`` saved
through the Agg canvas, never ``pyplot``; the same task colours, grid and dpi), so a report and
a run folder's PNGs look alike.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedcl.metrics.plots import _plot_matrix, _task_colors, finish_accuracy_axes
from fedcl.reports.runfolder import avg_acc, is_number

DPI = 120
# How events are marked on the accuracy-over-rounds figure: kind -> (colour, line style).
EVENT_STYLES = {
    "task": ("grey", "--"),
    "drift": ("tab:red", ":"),
    "delete": ("black", "-."),
    "join": ("tab:green", (0, (1, 3))),
    "leave": ("tab:purple", (0, (1, 3))),
}
EVENT_LABELS = {
    "task": "task switch",
    "task (some clients)": "task switch (some clients)",
    "drift": "drift",
    "delete": "deletion",
}
EVENT_OFFSETS = {"drift": 0.08, "delete": 0.16, "join": -0.08, "leave": -0.16}
# Per-round keys that are not system figures: they are drawn (or listed) elsewhere.
NOT_SYSTEM = {"round", "task", "acc", "acc_next", "avg_acc", "acc_by_concept", "client_acc"}
MAX_PANELS = 16


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def avg_acc_series(records: Sequence[Mapping[str, Any]]) -> dict[int, float]:
    """Round -> average accuracy over the seen tasks, for the rounds that were evaluated."""
    series = {}
    for i, record in enumerate(records):
        value = avg_acc(record)
        if value is not None:
            series[int(record.get("round", i + 1))] = value
    return series


def band(runs: Sequence[Mapping[int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rounds, mean, std) over runs of round -> value series; std (ddof=1) is NaN where fewer
    than two runs have a value, the mean NaN where none has."""
    rounds = np.array(sorted({r for run in runs for r in run}), dtype=int)
    table = np.array([[run.get(int(r), math.nan) for r in rounds] for run in runs], dtype=float)
    table = table.reshape(len(runs), len(rounds))
    count = (~np.isnan(table)).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, np.nansum(table, axis=0) / np.maximum(count, 1), math.nan)
        deviation = np.where(np.isnan(table), 0.0, table - mean) ** 2
        std = np.where(count > 1, np.sqrt(deviation.sum(axis=0) / (count - 1)), math.nan)
    return rounds, mean, std


def compare_figure(curves: Sequence[tuple[str, Sequence[Mapping[int, float]]]]) -> bytes:
    """Average accuracy over rounds, one line per (label, per-seed series); a band of ± one
    std across the seeds where a run has several."""
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.add_subplot()
    colors = _task_colors(max(1, len(curves)))
    for (label, runs), color in zip(curves, colors, strict=True):
        rounds, mean, std = band(runs)
        if not len(rounds):
            continue
        seeds = f" ({len(runs)} seeds, ± 1 std)" if len(runs) > 1 else ""
        marker = "." if len(rounds) < 60 else None
        ax.plot(rounds, mean, color=color, linewidth=1.8, marker=marker, label=label + seeds)
        if len(runs) > 1:
            ax.fill_between(rounds, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
    finish_accuracy_axes(
        ax,
        ylabel="average accuracy over seen tasks",
        title="Average accuracy of the global model over the tasks seen so far",
    )
    return png(fig)


def task_accuracy_figure(
    records: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    num_tasks: int,
    title: str = "",
    num_clients: int | None = None,
) -> bytes:
    """Accuracy on each task over rounds (as the run's accuracy.png), the average in black, and
    the run's events as vertical lines just before the round they apply in: task switches,
    drift, deletions, joins and leaves (one style per kind, named in the legend; task switches of
    only some of the `num_clients` clients as ticks at the top, see `event_rounds`)."""
    evals = [(int(r.get("round", i + 1)), r["acc"]) for i, r in enumerate(records) if r.get("acc")]
    fig = Figure(figsize=(10, 5), layout="constrained")
    ax = fig.add_subplot()
    colors = _task_colors(max(num_tasks, 1))
    for task in range(num_tasks):
        points = [(x, float(acc[str(task)])) for x, acc in evals if acc.get(str(task)) is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            marker = "." if len(xs) < 60 else None
            ax.plot(xs, ys, color=colors[task], linewidth=1.3, marker=marker, label=f"task {task}")
    series = avg_acc_series(records)
    ax.plot(
        list(series),
        list(series.values()),
        color="black",
        linewidth=3.0,
        zorder=1.5,
        label="average over seen tasks",
    )
    first_round = min((x for x, _ in evals), default=1)
    for kind, rounds in event_rounds(events, num_clients).items():
        color, style = EVENT_STYLES.get(kind.split(" ")[0], ("tab:brown", "-"))
        shown = [r for r in rounds if not (kind == "task" and r <= first_round)]
        for n, x in enumerate(shown):
            label = EVENT_LABELS.get(kind, f"{kind} event") if n == 0 else None
            if kind == "task (some clients)":  # per-client switches: ticks, not lines
                ax.plot(x - 0.5, 1.0, marker="v", color=color, linestyle="none", label=label)
                continue
            # Kinds sharing a round sit side by side instead of hiding one another.
            offset = EVENT_OFFSETS.get(kind, 0.0)
            ax.axvline(x - 0.5 + offset, color=color, linestyle=style, linewidth=1.2, label=label)
    heading = "Accuracy on each seen task, with the run's events"
    finish_accuracy_axes(
        ax,
        xlabel="round (an event line sits just before the round it applies in)",
        ylabel="test accuracy of the global model",
        title=f"{title}\n{heading}" if title else heading,
        legend_columns=1 + num_tasks // 16,
    )
    return png(fig)


def event_rounds(
    events: Sequence[Mapping[str, Any]], num_clients: int | None = None
) -> dict[str, list[int]]:
    """Kind -> the sorted rounds with events of that kind. Task events are split into ``task``
    (every client switches that round: ``clients: all``, or all `num_clients` listed) and
    ``task (some clients)`` (per-client boundaries); without `num_clients` every task round
    counts as ``task``."""
    rounds: dict[str, set[int]] = {}
    task_clients: dict[int, set] = {}
    for event in events:
        kind, x = str(event.get("kind")), int(event.get("round", 0))
        if kind != "task":
            rounds.setdefault(kind, set()).add(x)
            continue
        clients = event.get("clients")
        bucket = task_clients.setdefault(x, set())
        if isinstance(clients, list):
            bucket.update(clients)
        else:
            bucket.add("all")
    for x, clients in task_clients.items():
        every = num_clients is None or "all" in clients or len(clients) >= num_clients
        rounds.setdefault("task" if every else "task (some clients)", set()).add(x)
    return {kind: sorted(xs) for kind, xs in rounds.items()}


def matrix_figure(records: Sequence[Mapping[str, Any]], num_tasks: int, title: str = "") -> bytes:
    """The task-end accuracy matrix heat map, drawn by `fedcl.metrics.plots` (as the run's
    accuracy_matrix.png); `ValueError` for records the matrix rejects."""
    buffer = io.BytesIO()
    _plot_matrix(records, num_tasks, title, buffer)
    return buffer.getvalue()


def client_spread_figure(records: Sequence[Mapping[str, Any]]) -> bytes | None:
    """Per-client accuracy over rounds (each client on its current task, under its own concept:
    ``client_acc``): median, quartile band and min-max band, beside each concept's average;
    None when no round records per-client accuracy."""
    rows = [(int(r.get("round", i + 1)), r) for i, r in enumerate(records) if r.get("client_acc")]
    if not rows:
        return None
    rounds = [x for x, _ in rows]
    values = [
        np.array([float(v) for v in r["client_acc"].values() if v is not None]) for _, r in rows
    ]
    low, q1, median, q3, high = (
        np.array([np.percentile(v, q) if len(v) else math.nan for v in values])
        for q in (0, 25, 50, 75, 100)
    )
    fig = Figure(figsize=(10, 5), layout="constrained")
    ax = fig.add_subplot()
    ax.fill_between(
        rounds, low, high, color="tab:blue", alpha=0.12, linewidth=0, label="clients: min to max"
    )
    ax.fill_between(
        rounds,
        q1,
        q3,
        color="tab:blue",
        alpha=0.3,
        linewidth=0,
        label="clients: 25th to 75th percentile",
    )
    ax.plot(rounds, median, color="tab:blue", linewidth=2.0, label="clients: median")
    concepts = sorted({c for _, r in rows for c in r.get("acc_by_concept") or {}})
    colors = [colormaps["Dark2"](i % 8) for i in range(len(concepts))]
    for concept, color in zip(concepts, colors, strict=True):
        points = []
        for x, r in rows:
            accs = (r.get("acc_by_concept") or {}).get(concept) or {}
            numbers = [float(v) for v in accs.values() if v is not None]
            if numbers:
                points.append((x, sum(numbers) / len(numbers)))
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(
                xs,
                ys,
                color=color,
                linewidth=1.0,
                linestyle="--",
                label=f"concept {concept}: mean over tasks",
            )
    finish_accuracy_axes(
        ax,
        ylabel="accuracy",
        title="Per-client accuracy (each client's current task, under its own concept)",
    )
    return png(fig)


def round_series(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[int, float]]:
    """Every per-round number of the records that is not an accuracy (round and task times,
    clients online and sampled, replies, bytes, memory, training metrics, ...): name -> round ->
    value. Nested mappings give dotted names (``train.train-loss``); lists give their length
    (``failures``), so a count of failures per round is drawn too."""
    out: dict[str, dict[int, float]] = {}
    for i, record in enumerate(records):
        x = int(record.get("round", i + 1))
        for name, value in _numbers(record, ""):
            out.setdefault(name, {})[x] = value
    return out


def _numbers(record: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, float]]:
    for key, value in record.items():
        name = f"{prefix}{key}"
        if not prefix and key in NOT_SYSTEM:
            continue
        if isinstance(value, Mapping):
            yield from _numbers(value, f"{name}.")
        elif isinstance(value, list) and not prefix:
            yield f"{name} (count)", float(len(value))
        elif is_number(value) and math.isfinite(value):
            yield name, float(value)


def system_figure(records: Sequence[Mapping[str, Any]]) -> tuple[bytes | None, list[str]]:
    """Small multiples of `round_series`, one panel per per-round number (timings first); at
    most 16 panels. Returns (PNG or None when there is nothing to draw, the names left out)."""
    series = round_series(records)
    names = sorted(series, key=lambda n: (not n.endswith("_s"), "." in n, n))
    shown, left_out = names[:MAX_PANELS], names[MAX_PANELS:]
    if not shown:
        return None, left_out
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(3.4 * cols, 2.4 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes.flat, shown, strict=False):
        points = series[name]
        ax.plot(
            list(points),
            list(points.values()),
            color="tab:blue",
            linewidth=1.2,
            marker="." if len(points) < 60 else None,
        )
        ax.set_title(name, fontsize="small")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize="x-small")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(shown) :]:
        ax.set_visible(False)
    fig.suptitle("Per-round system and training figures (x: round)")
    return png(fig), left_out
