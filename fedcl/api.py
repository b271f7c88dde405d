"""The Python API: `fedcl.run(config, *overrides, **values)` from a notebook or script."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedcl.config import load_config
from fedcl.engine.loop import RunResult, run_simulation


def run(
    config: str | Path | Mapping[str, Any] | None = None,
    *overrides: str,
    out: str | Path | None = None,
    progress: bool | None = None,
    **values: Any,
) -> RunResult:
    """Run one experiment; return its result (summary, per-round records, final arrays, folder).

    `config` is a YAML path, a (nested) mapping or an OmegaConf config, or None for the defaults.
    `overrides` are dotted ``"key=value"`` strings, as on the command line; `values` set dotted
    keys to Python values, e.g. ``fedcl.run(path, rounds=3)`` or
    ``fedcl.run(path, **{"strategy.target": "pkg.mod:Cls"})``. Validation and errors are the
    CLI's: a bad key or value raises a one-line `fedcl.ConfigError` before anything is written.
    The run folder is `out` (default ``runs/<name>-<time>``), written as by ``fedcl run``.
    """
    if len(overrides) == 1 and not isinstance(overrides[0], str):
        overrides = tuple(overrides[0])  # the older form run(config, ["k=v", ...])
    return run_simulation(load_config(config, overrides, values), out, progress=progress)
