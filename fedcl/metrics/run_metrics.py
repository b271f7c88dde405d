"""Run-level additions to summary.json beside the continual metrics: which rounds are evaluated
(`eval.every`) and at what resolution the stability-gap metrics are therefore computed, the
validation split's metrics, drift recovery and the system figures."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fedcl.metrics.continual import continual_summary, stream_summary
from fedcl.metrics.drift import DriftPoint, drift_recovery, recovery_summary
from fedcl.metrics.system import system_summary

# The summary keys computed from every evaluation (not only task ends): their resolution is the
# evaluation interval.
STABILITY_GAP_KEYS = ("min_acc", "wc_acc", "windowed_forgetting")
# The continual metrics repeated, prefixed with val_, for the validation split.
VALIDATION_KEYS = ("acc", "bwt", "fgt", "forgetting_max", "min_acc", "wc_acc")


def evaluation_rounds(rounds: int, every: int, task_ends: Iterable[int]) -> frozenset[int]:
    """The rounds the global model is evaluated after: every `every`-th round, each round in
    `task_ends` (a task's last round: the task-end accuracy matrix needs it) and the final round.
    Raises ValueError for `every` < 1."""
    if every < 1:
        raise ValueError(f"eval.every must be >= 1, got {every}")
    chosen = {r for r in range(every, rounds + 1, every)}
    chosen.update(r for r in task_ends if 1 <= r <= rounds)
    chosen.add(rounds)
    return frozenset(chosen)


def resolution(every: int) -> dict[str, Any]:
    """summary.json's statement of how often the model was evaluated: ``eval_every`` and
    ``stability_gap_resolution``, which says which metrics that interval applies to."""
    if every == 1:
        text = "every round"
    else:
        text = f"every {every} rounds, plus each task's last round and the final round"
    return {
        "eval_every": every,
        "stability_gap_resolution": f"{', '.join(STABILITY_GAP_KEYS)} computed from "
        f"evaluations {text}",
    }


def drift_points(timeline: Iterable[Any]) -> list[DriftPoint]:
    """The drift events of a scenario's timeline (`fedcl.scenario.events.Event`), in order."""
    return [
        DriftPoint(
            event=int(e.index),
            round=int(e.round),
            type=str(e.params.get("type", "")),
            clients=len(e.clients),
        )
        for e in timeline
        if e.kind == "drift"
    ]


def validation_summary(
    records: Sequence[Mapping[str, Any]], num_tasks: int, sequential: bool
) -> dict[str, Any]:
    """The continual metrics on the validation split (``val_acc``, ``val_bwt``, ``val_fgt``,
    ``val_forgetting_max``, ``val_min_acc``, ``val_wc_acc``) from the records' ``val_acc``;
    empty when no record carries one."""
    rows = [
        {"round": r["round"], "task": r["task"], "acc": r["val_acc"]}
        for r in records
        if r.get("val_acc")
    ]
    if not rows:
        return {}
    found = continual_summary(rows, num_tasks) if sequential else stream_summary(rows)
    return {f"val_{key}": found.get(key) for key in VALIDATION_KEYS}


def run_summary(
    records: Sequence[Mapping[str, Any]],
    *,
    num_tasks: int,
    sequential: bool,
    timeline: Iterable[Any],
    every: int,
    tolerance: float,
) -> dict[str, Any]:
    """Everything this module adds to summary.json: `resolution`, `validation_summary`, the
    drift recovery of every drift event in `timeline` (`fedcl.metrics.drift`) and the system
    figures (`fedcl.metrics.system.system_summary`)."""
    summary = resolution(every)
    summary.update(validation_summary(records, num_tasks, sequential))
    drifts = drift_points(timeline)
    if drifts:
        summary.update(recovery_summary(drift_recovery(records, drifts, tolerance), tolerance))
    summary.update(system_summary(records))
    return summary
