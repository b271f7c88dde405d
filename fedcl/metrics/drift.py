"""Drift recovery: how far accuracy falls at each drift event, and how many rounds it takes to
come back.

For a drift event applied before training in round r:

* ``pre_acc``: the mean accuracy, over the tasks evaluated then, at the last evaluation before r
  (the accuracy the drift is measured against); the same tasks are followed after the event,
  so a task started later does not count as a drop.
* ``acc_at_drift``: that mean at the first evaluation at or after r; ``drop`` = pre − it.
* ``max_drop``: pre − the lowest such mean from r until recovery (or the run's end).
* ``recovered_round``: the first evaluated round t >= r whose mean is back within
  ``tolerance`` of ``pre_acc`` (>= pre − tolerance); ``rounds_to_recover`` = t − r (0: the
  accuracy at the event was already within tolerance). Both None, and ``recovered`` false, when
  no later evaluation comes back: "not recovered".

Rounds are counted at the resolution of the evaluations (``eval.every``): a recovery is seen at
the first evaluated round it holds in.

Every function here is pure and returns JSON-ready values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DriftPoint:
    """A drift event as recovery needs it: its index in the timeline, round, type and how many
    clients it touches."""

    event: int
    round: int
    type: str = ""
    clients: int = 0


def _mean_over(acc: Mapping[str, Any], tasks: Sequence[str]) -> float | None:
    values = [acc.get(t) for t in tasks]
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(kept) / len(kept) if len(kept) == len(tasks) and kept else None


def drift_recovery(
    records: Sequence[Mapping[str, Any]],
    drifts: Sequence[DriftPoint],
    tolerance: float = 0.02,
    acc_key: str = "acc",
) -> list[dict[str, Any]]:
    """One entry per drift event (in the order given): its round, type, clients, ``pre_acc``,
    ``acc_at_drift``, ``drop``, ``max_drop``, ``recovered``, ``recovered_round`` and
    ``rounds_to_recover``, as the module docstring defines them. An event with no evaluation
    before it (or none from it on) has None for what cannot be measured and ``recovered`` None.

    `records` are metrics.jsonl lines in round order; those without `acc_key` (rounds not
    evaluated) are skipped. Raises ValueError for a negative `tolerance`.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    evals = [r for r in records if r.get(acc_key)]
    out = []
    for drift in drifts:
        entry: dict[str, Any] = {
            "event": drift.event,
            "round": drift.round,
            "type": drift.type,
            "clients": drift.clients,
            "pre_acc": None,
            "acc_at_drift": None,
            "drop": None,
            "max_drop": None,
            "recovered": None,
            "recovered_round": None,
            "rounds_to_recover": None,
        }
        out.append(entry)
        before = [r for r in evals if r["round"] < drift.round]
        after = [r for r in evals if r["round"] >= drift.round]
        if not before or not after:
            continue
        tasks = sorted(before[-1][acc_key])
        pre = _mean_over(before[-1][acc_key], tasks)
        series = [(int(r["round"]), _mean_over(r[acc_key], tasks)) for r in after]
        series = [(t, a) for t, a in series if a is not None]
        if pre is None or not series:
            continue
        entry.update(pre_acc=pre, acc_at_drift=series[0][1], drop=pre - series[0][1])
        lowest = series[0][1]
        entry["recovered"] = False
        for t, acc in series:
            lowest = min(lowest, acc)
            if acc >= pre - tolerance:
                entry.update(recovered=True, recovered_round=t, rounds_to_recover=t - drift.round)
                break
        entry["max_drop"] = pre - lowest
    return out


def recovery_summary(events: Sequence[Mapping[str, Any]], tolerance: float) -> dict[str, Any]:
    """summary.json's drift keys from `drift_recovery`'s entries: ``drift_recovery`` (the
    tolerance and every event), ``drift_drop`` (mean drop at the events measured),
    ``drift_rounds_to_recover`` (mean over the recovered events) and ``drift_not_recovered``
    (how many measured events never recovered); the means are None when nothing qualifies."""
    measured = [e for e in events if e["drop"] is not None]
    recovered = [e["rounds_to_recover"] for e in measured if e["recovered"]]
    return {
        "drift_recovery": {"tolerance": tolerance, "events": list(events)},
        "drift_drop": sum(e["drop"] for e in measured) / len(measured) if measured else None,
        "drift_rounds_to_recover": sum(recovered) / len(recovered) if recovered else None,
        "drift_not_recovered": sum(1 for e in measured if not e["recovered"]),
    }
