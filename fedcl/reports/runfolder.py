"""Reading what `fedcl run` leaves: a run folder, or the parent folder of a multi-seed run.

A run folder holds ``config.yaml`` and ``metrics.jsonl`` from its first round on; ``summary.json``
is written last, so a run folder without it was interrupted. A multi-seed parent
(``fedcl run --seeds``) holds one run folder per seed and a ``summary.json`` whose ``kind`` is
``"seeds"``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedcl.errors import FedclError
from fedcl.metrics.continual import read_metrics

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
EVENTS = "events.jsonl"
SEEDS_KIND = "seeds"  # summary.json's `kind` in the parent folder of a multi-seed run


@dataclass
class RunFolder:
    """One run folder as read from disk.

    `summary` is None when the run was interrupted (no summary.json); `records` are the rounds
    of metrics.jsonl that exist (a line cut off by a crash dropped), `events` the applied events.
    """

    path: Path
    config: dict[str, Any]
    config_text: str
    summary: dict[str, Any] | None
    records: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def interrupted(self) -> bool:
        """True when the run never wrote its summary.json (it stopped before its end)."""
        return self.summary is None

    @property
    def num_tasks(self) -> int:
        """`scenario.num_tasks` of its config, or one more than the highest task recorded."""
        value = (self.config.get("scenario") or {}).get("num_tasks")
        if isinstance(value, int) and value > 0:
            return value
        tasks = [int(key) for r in self.records for key in (r.get("acc") or {})]
        return max(tasks, default=0) + 1

    @property
    def strategy(self) -> str:
        """The strategy's short name: `strategy.name`, or the class name of `strategy.target`."""
        if self.summary and isinstance(self.summary.get("strategy"), str):
            return short_strategy(self.summary["strategy"])
        section = self.config.get("strategy") or {}
        return short_strategy(str(section.get("target") or section.get("name") or ""))


def short_strategy(name: str) -> str:
    """``flwr.serverapp.strategy.FedProx`` or ``pkg.mod:Cls`` -> ``FedProx`` / ``Cls``."""
    return name.replace(":", ".").rsplit(".", 1)[-1]


def is_seeds_parent(path: str | Path) -> bool:
    """Whether `path` is the parent folder of a multi-seed run (its summary.json says so)."""
    summary = _read_json(Path(path) / SUMMARY)
    return isinstance(summary, dict) and summary.get("kind") == SEEDS_KIND


def read_seeds_summary(path: str | Path) -> dict[str, Any]:
    """The aggregate summary.json of the multi-seed parent `path`; `FedclError` if it is none."""
    summary = _read_json(Path(path) / SUMMARY)
    if not (isinstance(summary, dict) and summary.get("kind") == SEEDS_KIND):
        raise FedclError(f"{path} is not a multi-seed run folder (no summary.json of kind 'seeds')")
    return summary


def read_run(path: str | Path) -> RunFolder:
    """Read the run folder `path`.

    Raises a one-line `FedclError` when `path` does not exist, is a multi-seed parent (saying
    which of its folders to give instead), or is not a run folder (no config.yaml and
    metrics.jsonl).
    """
    path = Path(path)
    if not path.is_dir():
        raise FedclError(f"{path} is not a folder; give a run folder written by fedcl run")
    if is_seeds_parent(path):
        runs = read_seeds_summary(path).get("runs") or {}
        first = path / next(iter(runs.values()), "seed_0")
        raise FedclError(
            f"{path} holds a multi-seed run; give one of its run folders (e.g. {first}), "
            f"or compare its seeds: fedcl compare {path}"
        )
    missing = [name for name in (CONFIG, METRICS) if not (path / name).is_file()]
    if missing:
        raise FedclError(
            f"{path} is not a run folder (no {' or '.join(missing)}); "
            "give a folder written by fedcl run"
        )
    config_text = (path / CONFIG).read_text(encoding="utf-8")
    try:
        config = yaml.safe_load(config_text) or {}
        records = read_metrics(path / METRICS)
        events = read_metrics(path / EVENTS) if (path / EVENTS).is_file() else []
    except (yaml.YAMLError, ValueError) as exc:
        raise FedclError(f"{path} holds a damaged run: {_first_line(exc)}") from None
    summary = _read_json(path / SUMMARY)
    if summary is not None and not isinstance(summary, dict):
        raise FedclError(f"{path / SUMMARY} is not a JSON object")
    config = config if isinstance(config, dict) else {}
    return RunFolder(path, config, config_text, summary, records, events)


def scalar_metrics(summary: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Every finite number of a summary, nested mappings flattened to dotted names.

    ``{"acc": 0.5, "deletion_audit": {"deleted": 3}, "status": "completed", "accuracy_matrix":
    [...], "vectorized": false}`` gives ``{"acc": 0.5, "deletion_audit.deleted": 3.0}``:
    strings, lists, booleans, nulls and NaN are left out.
    """
    out: dict[str, float] = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalar_metrics(value, f"{name}."))
        elif is_number(value) and math.isfinite(value):
            out[name] = float(value)
    return out


def avg_acc(record: Mapping[str, Any]) -> float | None:
    """A round's average accuracy over the seen tasks (`avg_acc`, else the mean of `acc`);
    None for a round that was not evaluated."""
    value = record.get("avg_acc")
    if is_number(value):
        return float(value)
    accs = record.get("acc")
    if isinstance(accs, Mapping) and accs:
        values = [float(v) for v in accs.values() if v is not None]
        return sum(values) / len(values) if values else None
    return None


def dotted(config: Mapping[str, Any], key: str) -> Any:
    """The value at the dotted `key` of a nested mapping; KeyError if absent."""
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(key)
        value = value[part]
    return value


def is_number(value: Any) -> bool:
    """True for an int or float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
