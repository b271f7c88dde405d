"""Continual-evaluation metrics computed from the per-round records of a run.

Two families, as defined in the project reference (``algorithms.md`` §4):

* Lopez-Paz & Ranzato (GEM, 2017) on the task-end accuracy matrix R: ``acc``, ``bwt``, ``fwt``,
  ``fgt`` (= −BWT, the FGT that FOT and most FCL papers report), plus Chaudhry et al. (2018)
  max-based forgetting under its own name, ``forgetting_max``.
* De Lange et al. (2023) on every round's evaluation: ``min_acc``, ``wc_acc``,
  ``windowed_forgetting``.

A record is one line of ``metrics.jsonl``: ``{"round": r, "task": t, "acc": {"0": a0, ...},
"acc_next": {"t+1": a}, ...}``, written after aggregation in round r while task t is trained.
Tasks are trained in order, so ``task`` never decreases along the records.

Every function here is pure: it reads the records and returns plain Python numbers and lists
that ``json.dumps`` accepts (no numpy scalars, no NaN).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

ROUND = "round"
TASK = "task"
ACC = "acc"
ACC_NEXT = "acc_next"


def read_metrics(path: str | Path) -> list[dict]:
    """Read a ``metrics.jsonl`` file into a list of records, in file order.

    Blank lines are skipped. A final line that is cut off (no trailing newline and not valid
    JSON) is dropped, so a run killed mid-write can still be summarised; any other malformed
    line raises ``ValueError`` naming the file and line number.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records: list[dict] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            is_cut_off_tail = number == len(lines) and not text.endswith("\n")
            if is_cut_off_tail:
                break
            raise ValueError(f"{path}:{number}: not a JSON object: {err}") from err
    return records


def _evaluations(records: Sequence[Mapping]) -> list[Mapping]:
    """The records that carry an evaluation, checked for the order the metrics rely on."""
    evals = [r for r in records if ACC in r]
    if not evals:
        raise ValueError("no evaluation records (records with an 'acc' key) to summarise")
    previous = -1
    for record in evals:
        task = int(record[TASK])
        if task < previous:
            raise ValueError(
                f"task goes back from {previous} to {task} at round {record.get(ROUND)}; "
                "continual metrics need tasks trained in order"
            )
        previous = task
    return evals


def _get(accs: Mapping | None, task: int) -> float:
    """Accuracy on ``task`` from an ``acc``/``acc_next`` mapping, NaN when not evaluated."""
    if not accs:
        return math.nan
    value = accs.get(str(task))
    return math.nan if value is None else float(value)


def accuracy_matrix(records: Sequence[Mapping], num_tasks: int) -> np.ndarray:
    """The Lopez-Paz task-end accuracy matrix of a run.

    Returns a ``(num_tasks, num_tasks)`` float array where ``R[i, j]`` is the accuracy on task j
    at the end of task i, i.e. in the last record whose ``task == i``: columns ``j <= i`` come
    from that record's ``acc``, column ``i + 1`` from its ``acc_next``. Every other entry, and
    every row of a task the run never reached, is NaN. Records without ``acc`` are ignored.
    Raises ``ValueError`` if there are no evaluation records, tasks go backwards, or a task id
    is outside ``[0, num_tasks)``.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    matrix = np.full((num_tasks, num_tasks), np.nan)
    task_end: dict[int, Mapping] = {}
    for record in _evaluations(records):
        task = int(record[TASK])
        if not 0 <= task < num_tasks:
            raise ValueError(
                f"round {record.get(ROUND)} trains task {task}, outside [0, {num_tasks})"
            )
        task_end[task] = record  # later rounds of the same task overwrite: the last one wins
    for i, record in task_end.items():
        for j in range(i + 1):
            matrix[i, j] = _get(record[ACC], j)
        if i + 1 < num_tasks:
            matrix[i, i + 1] = _get(record.get(ACC_NEXT), i + 1)
    return matrix


def _mean(values: Sequence[float]) -> float | None:
    """Mean of the non-NaN values, or None when there are none."""
    kept = [v for v in values if not math.isnan(v)]
    return float(sum(kept) / len(kept)) if kept else None


def _best(values: np.ndarray) -> float:
    """Largest non-NaN value, NaN when there is none."""
    kept = values[~np.isnan(values)]
    return float(kept.max()) if kept.size else math.nan


def _windowed_drop(series: Sequence[float], window: int) -> float:
    """Largest ``series[i] - series[j]`` with ``i < j < i + window``; 0 when nothing drops."""
    worst = 0.0
    for j in range(1, len(series)):
        best_before = max(series[max(0, j - window + 1) : j], default=-math.inf)
        worst = max(worst, best_before - series[j])
    return worst


def continual_summary(
    records: Sequence[Mapping],
    num_tasks: int,
    init_acc: Mapping[str, float] | None = None,
    window: int = 10,
) -> dict[str, float | list | int | None]:
    """Summarise a run's continual-learning behaviour from its per-round records.

    Let k be the number of tasks seen (final record's ``task`` + 1) and A_final the final
    record's ``acc``. For a complete run (k == num_tasks) A_final is row T-1 of R and the
    metrics are exactly the published ones; for a run that stopped early, the final record
    stands in for row T-1 and only the k tasks seen are averaged over.

    Keys of the returned dict (all JSON-serialisable, never NaN):

    * ``acc``: mean of A_final over tasks 0..k-1 (Lopez-Paz ACC).
    * ``bwt``: mean over j < k-1 of A_final[j] - R[j, j] (Lopez-Paz BWT, paper's 1/(T-1));
      0.0 when k == 1.
    * ``fgt``: -bwt (FOT's FGT: mean drop from the task's own end to the final round).
    * ``forgetting_max``: mean over j < k-1 of max_{j <= l < k-1} R[l, j] - A_final[j]
      (Chaudhry's max-based forgetting); rows l < j are left out of the max because task j had
      not been trained there. 0.0 when k == 1. Always >= fgt.
    * ``fwt``: mean over 1 <= j < k of R[j-1, j] - init_acc[j] (Lopez-Paz FWT); 0.0 when k == 1,
      None when ``init_acc`` is not given or no term can be formed.
    * ``min_acc``: mean over tasks j < k-1 of the minimum accuracy on task j over the rounds
      training a later task (De Lange min-ACC); None when k == 1.
    * ``wc_acc``: (1/k) A_final[k-1] + (1 - 1/k) min_acc (De Lange WC-ACC at the final round);
      A_final[k-1] when k == 1, None when the final record lacks the current task.
    * ``windowed_forgetting``: for each task, the largest drop a_i - a_j (i < j < i + window)
      among the rounds evaluating it in ``acc``, averaged over the tasks seen (De Lange WF^w).
    * ``accuracy_matrix``: R as nested lists, None where R is NaN.
    * ``tasks_seen``: k; ``final_round``: the final record's ``round`` (None if absent).

    Means skip entries a record did not evaluate, so a missing value never becomes NaN; a key
    whose mean has no entries at all is None.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1 evaluation, got {window}")
    matrix = accuracy_matrix(records, num_tasks)
    evals = _evaluations(records)
    final = evals[-1]
    current = int(final[TASK])
    seen = current + 1
    final_acc = [_get(final[ACC], j) for j in range(seen)]

    old = range(seen - 1)
    if seen == 1:
        bwt: float | None = 0.0
        forgetting: float | None = 0.0
    else:
        bwt = _mean([final_acc[j] - matrix[j, j] for j in old])
        forgetting = _mean([_best(matrix[j : seen - 1, j]) - final_acc[j] for j in old])

    fwt: float | None = None
    if init_acc is not None and seen == 1:
        fwt = 0.0
    elif init_acc is not None:
        fwt = _mean([matrix[j - 1, j] - _get(init_acc, j) for j in range(1, seen)])

    later_minima = []
    for j in old:
        after = [_get(r[ACC], j) for r in evals if int(r[TASK]) > j]
        after = [a for a in after if not math.isnan(a)]
        later_minima.append(min(after) if after else math.nan)
    min_acc = _mean(later_minima)

    current_acc = final_acc[current]
    if math.isnan(current_acc):
        wc_acc: float | None = None
    elif min_acc is None:
        wc_acc = current_acc
    else:
        wc_acc = current_acc / seen + (1.0 - 1.0 / seen) * min_acc

    drops = []
    for j in range(seen):
        series = [_get(r[ACC], j) for r in evals]
        drops.append(_windowed_drop([a for a in series if not math.isnan(a)], window))

    return {
        "acc": _mean(final_acc),
        "bwt": bwt,
        "fgt": None if bwt is None else 0.0 - bwt,
        "forgetting_max": forgetting,
        "fwt": fwt,
        "min_acc": min_acc,
        "wc_acc": wc_acc,
        "windowed_forgetting": float(sum(drops) / len(drops)),
        "accuracy_matrix": [
            [None if math.isnan(v) else float(v) for v in row] for row in matrix.tolist()
        ],
        "tasks_seen": seen,
        "final_round": final.get(ROUND),
    }


def stream_summary(records: Sequence[Mapping], window: int = 10) -> dict[str, float | int | None]:
    """Summary for streams where the task-end matrix is undefined (asynchronous per-client
    boundaries, recurring tasks): built from every round's evaluation of every seen task.

    * ``acc``: mean over the tasks in the final record's ``acc`` of their final accuracy.
    * ``forgetting_max``: mean over those tasks of (best accuracy at any earlier evaluation −
      final): max-based as Chaudhry's, over every evaluation instead of task ends.
    * ``windowed_forgetting``: as in `continual_summary`, over each task's evaluations.
    * ``bwt``, ``fgt``, ``fwt``, ``min_acc``, ``wc_acc``: None (they need tasks learned once, in
      order).
    * ``tasks_seen``, ``final_round``.
    """
    evals = [r for r in records if ACC in r]
    if not evals:
        raise ValueError("no evaluation records (records with an 'acc' key) to summarise")
    final = evals[-1][ACC]
    history: dict[str, list[float]] = {}
    for record in evals:
        for task, value in record[ACC].items():
            if value is not None and not math.isnan(value):
                history.setdefault(task, []).append(float(value))
    finals = {t: float(v) for t, v in final.items() if v is not None and not math.isnan(v)}
    drops = [max(history[t]) - finals[t] for t in finals]
    return {
        "acc": _mean(list(finals.values())),
        "bwt": None,
        "fgt": None,
        "forgetting_max": _mean(drops),
        "fwt": None,
        "min_acc": None,
        "wc_acc": None,
        "windowed_forgetting": _mean(
            [_windowed_drop(series, window) for series in history.values()]
        ),
        "tasks_seen": len(history),
        "final_round": evals[-1].get(ROUND),
    }
