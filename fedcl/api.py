"""The Python API: `fedcl.run(config, *overrides, **values)` from a notebook or script."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedcl.config import load_config
from fedcl.engine.checkpoint import finished_summary, prepare_resume
from fedcl.engine.loop import RunResult, run_simulation
from fedcl.engine.pool import ray_stopped_on_interrupt
from fedcl.errors import ConfigError
from fedcl.metrics.continual import read_metrics


def run(
    config: str | Path | Mapping[str, Any] | None = None,
    *overrides: str,
    out: str | Path | None = None,
    progress: bool | None = None,
    resume: str | Path | None = None,
    **values: Any,
) -> RunResult:
    """Run one experiment; return its result (summary, per-round records, final arrays, folder).

    `config` is a YAML path, a (nested) mapping or an OmegaConf config, or None for the defaults.
    `overrides` are dotted ``"key=value"`` strings, as on the command line; `values` set dotted
    keys to Python values, e.g. ``fedcl.run(path, rounds=3)`` or
    ``fedcl.run(path, **{"strategy.target": "pkg.mod:Cls"})``. Validation and errors are the
    CLI's: a bad key or value raises a one-line `fedcl.ConfigError` before anything is written.
    The run folder is `out` (default ``runs/<name>-<time>``), written as by ``fedcl run``.
    Several seeds in one call: `fedcl.run_seeds` (``fedcl run --seeds``).

    ``run(resume=RUN_DIR)`` continues the run in RUN_DIR (config from its config.yaml; no
    config, overrides or `out` then) from its latest good checkpoint, as ``fedcl run --resume``:
    its metrics.jsonl and summary.json end as an uninterrupted run's would. A run that already
    completed is returned as its folder holds it (summary and records, no arrays).
    """
    if resume is not None:
        if config is not None or overrides or values or out is not None:
            raise ConfigError(
                "resume takes the config from the run folder's config.yaml: "
                "give no config, overrides or out with it"
            )
        with ray_stopped_on_interrupt():
            return _resume(Path(resume), progress)
    if len(overrides) == 1 and not isinstance(overrides[0], str):
        overrides = tuple(overrides[0])  # the older form run(config, ["k=v", ...])
    with ray_stopped_on_interrupt():
        return run_simulation(load_config(config, overrides, values), out, progress=progress)


def _resume(run_dir: Path, progress: bool | None) -> RunResult:
    """`run(resume=run_dir)`: the stored result of a completed run, else the run continued."""
    summary = finished_summary(run_dir)
    if summary is not None:
        return RunResult(run_dir, summary, read_metrics(run_dir / "metrics.jsonl"))
    cfg, point = prepare_resume(run_dir)
    try:
        return run_simulation(cfg, run_dir, progress=progress, resume=point)
    finally:
        point.lock.release()
