"""The run folder: config.yaml, metrics.jsonl (a line per round), summary.json, plots."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path
from typing import Any, TextIO

from fedcl.errors import FedclError

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json")


def _json_safe(value: Any) -> Any:
    """Plain JSON: NaN and infinities become null, tuples become lists, numpy scalars Python."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def ensure_no_run_in(out_dir: str | Path) -> None:
    """Raise `FedclError` if `out_dir` already holds a run (so no run is ever overwritten)."""
    existing = [name for name in RUN_FILES if (Path(out_dir) / name).exists()]
    if existing:
        raise FedclError(
            f"{out_dir} already holds a run ({existing[0]}); choose another --out folder"
        )


class RunRecorder:
    """Writes one run's files; refuses a folder that already holds a run, so none is overwritten."""

    def __init__(self, out_dir: str | Path, config_yaml: str) -> None:
        self.out_dir = Path(out_dir)
        ensure_no_run_in(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(config_yaml)
        self._metrics = (self.out_dir / "metrics.jsonl").open("a", encoding="utf-8")
        self._events: TextIO | None = None  # events.jsonl, opened at the first event

    def record_round(self, row: dict[str, Any]) -> None:
        """Append one round's metrics as a JSON line, flushed so a crash loses nothing written."""
        self._metrics.write(json.dumps(_json_safe(row)) + "\n")
        self._metrics.flush()

    def record_event(self, entry: dict[str, Any]) -> None:
        """Append one applied event to events.jsonl."""
        if self._events is None:
            self._events = (self.out_dir / "events.jsonl").open("a", encoding="utf-8")
        self._events.write(json.dumps(_json_safe(entry)) + "\n")
        self._events.flush()

    def write_summary(self, summary: dict[str, Any]) -> Path:
        """Write summary.json (last, so its presence means the run completed)."""
        path = self.out_dir / "summary.json"
        _atomic_write(path, json.dumps(_json_safe(summary), indent=2).encode())
        return path

    def write_checkpoint(self, server_round: int, state: dict[str, Any]) -> Path:
        """Write `checkpoints/round_XXXXX.pkl` atomically (a crash leaves no half file)."""
        path = self.out_dir / "checkpoints" / f"round_{server_round:05d}.pkl"
        path.parent.mkdir(exist_ok=True)
        _atomic_write(path, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))
        return path

    def close(self) -> None:
        """Close the metrics and events files."""
        self._metrics.close()
        if self._events is not None:
            self._events.close()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
