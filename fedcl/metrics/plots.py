"""Figures of a run's continual behaviour, written as PNG files.

Figures are built on ``matplotlib.figure.Figure`` and saved through the Agg canvas, never through
``pyplot``: no window opens, no global figure state is kept, and plotting from a worker thread or
a headless node is safe.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedcl.metrics.continual import ACC, ROUND, TASK, accuracy_matrix

ACCURACY_PNG = "accuracy.png"
MATRIX_PNG = "accuracy_matrix.png"


def _task_colors(num_tasks: int) -> list:
    if num_tasks <= 10:
        return [colormaps["tab10"](i) for i in range(num_tasks)]
    if num_tasks <= 20:
        return [colormaps["tab20"](i) for i in range(num_tasks)]
    return [colormaps["viridis"](x) for x in np.linspace(0.0, 0.95, num_tasks)]


def _titled(title: str, description: str) -> str:
    return f"{title}\n{description}" if title else description


def _plot_accuracy(records: Sequence[Mapping], num_tasks: int, title: str, path: Path) -> None:
    evals = [
        (int(r.get(ROUND, i + 1)), int(r[TASK]), r[ACC])
        for i, r in enumerate(r for r in records if ACC in r)
    ]
    rounds = [x for x, _, _ in evals]
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.add_subplot()

    colors = _task_colors(num_tasks)
    for task in range(num_tasks):
        key = str(task)
        xs = [x for x, _, acc in evals if key in acc]
        ys = [float(acc[key]) for _, _, acc in evals if key in acc]
        if xs:
            marker = "." if len(xs) < 60 else None
            ax.plot(xs, ys, color=colors[task], linewidth=1.3, marker=marker, label=f"task {task}")

    average = [
        float(np.mean([float(v) for v in acc.values()])) if acc else math.nan for _, _, acc in evals
    ]
    # Drawn under the task lines so a task whose curve coincides with it stays visible.
    ax.plot(
        rounds, average, color="black", linewidth=3.0, zorder=1.5, label="average over seen tasks"
    )

    # The boundary sits halfway between the last round of one task and the first of the next,
    # so it separates the two evaluations instead of hiding one of them.
    boundaries = [
        x - 0.5 for (_, before, _), (x, after, _) in itertools.pairwise(evals) if after != before
    ]
    for n, x in enumerate(boundaries):
        label = "task boundary" if n == 0 else None
        ax.axvline(x, color="grey", linestyle="--", linewidth=1.0, label=label)

    if rounds:
        ax.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)
    finish_accuracy_axes(
        ax,
        ylabel="test accuracy of the global model",
        title=_titled(title, "Accuracy of the global model on each seen task"),
        legend_columns=1 + num_tasks // 16,
    )
    fig.savefig(path, dpi=120)


def finish_accuracy_axes(
    ax, *, ylabel: str, title: str, xlabel: str = "round", legend_columns: int = 1
) -> None:
    """The look every accuracy-over-rounds plot shares: integer rounds, accuracy from 0 to 1, a
    light grid, the title, the legend to the right of the axes."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend(
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
        ncols=legend_columns,
        fontsize="small",
        frameon=False,
    )


def _plot_matrix(records: Sequence[Mapping], num_tasks: int, title: str, path: Path) -> None:
    matrix = accuracy_matrix(records, num_tasks)
    side = min(12.0, 4.5 + 0.4 * num_tasks)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="accuracy", shrink=0.8)

    if num_tasks <= 25:
        cell_points = 72.0 * 0.8 * side / num_tasks
        fontsize = max(5.0, min(11.0, 0.28 * cell_points))
        for (i, j), value in np.ndenumerate(matrix):
            if not math.isnan(value):
                # Dark text on the bright end of viridis, light text on the dark end.
                color = "black" if value > 0.6 else "white"
                ax.text(
                    j, i, f"{value:.2f}", ha="center", va="center", color=color, fontsize=fontsize
                )

    ticks = range(0, num_tasks, max(1, math.ceil(num_tasks / 20)))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after training task i")
    ax.set_title(
        _titled(
            title, "Accuracy R[i, j] at the end of task i\n(j = i + 1: next task, not yet trained)"
        )
    )
    fig.savefig(path, dpi=120)


def plot_run(
    records: Sequence[Mapping],
    out_dir: str | Path,
    num_tasks: int,
    title: str = "",
    matrix: bool = True,
) -> list[Path]:
    """Draw a run's accuracy curves and task-end accuracy matrix into ``out_dir``.

    Writes ``accuracy.png`` (accuracy on each seen task against the round, the average over seen
    tasks as a thick black line, dashed vertical lines where the task changes) and
    ``accuracy_matrix.png`` (a heatmap of ``accuracy_matrix(records, num_tasks)`` with values in
    the cells and NaN cells left blank). ``title``, when given, heads both figures above their
    description. Creates ``out_dir`` if needed, overwrites existing files, and returns the two
    paths in that order. Raises ``ValueError`` for records ``accuracy_matrix`` rejects.
    With ``matrix=False`` (streams whose tasks recur or switch per client, where the task-end
    matrix is undefined) only ``accuracy.png`` is drawn and returned.
    """
    if matrix:
        # The matrix validates the records, so bad input fails before anything is written.
        accuracy_matrix(records, num_tasks)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves, heatmap = out_dir / ACCURACY_PNG, out_dir / MATRIX_PNG
    _plot_accuracy(records, num_tasks, title, curves)
    if not matrix:
        return [curves]
    _plot_matrix(records, num_tasks, title, heatmap)
    return [curves, heatmap]
