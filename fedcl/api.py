"""The Python API: `fedcl.run(config, overrides)` from a notebook or script."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedcl.config import load_config
from fedcl.engine.loop import RunResult, run_simulation


def run(
    config: str | Path | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    *,
    out: str | Path | None = None,
    progress: bool | None = None,
) -> RunResult:
    """Run one experiment and return its result (the run folder is written as by the CLI).

    `config` is a YAML path, a (nested) mapping of config values, or None for the defaults;
    `overrides` are dotted `key=value` strings applied on top.
    """
    return run_simulation(load_config(config, overrides), out, progress=progress)
