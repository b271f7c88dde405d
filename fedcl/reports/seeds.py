"""Several seeds in one command: one run folder per seed under a parent, and their aggregate.

    PARENT/seed_0/  PARENT/seed_1/ ...   run folders, each as `fedcl run` writes one
    PARENT/summary.json                  kind "seeds": status, which seeds failed and why, and
                                         mean, std, n (and the per-seed values) of every scalar
                                         metric of the per-seed summaries

The runs go one after the other in this process and share its Ray (started by the first run).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcl.errors import ConfigError, FedclError
from fedcl.reports.runfolder import SEEDS_KIND, SUMMARY, is_seeds_parent, scalar_metrics

STD_NOTE = "sample standard deviation over the completed seeds (ddof=1); null when n < 2"


@dataclass
class SeedsResult:
    """What `run_seeds` leaves: the parent folder, its aggregate summary, the result of every
    seed that ran to its end (`fedcl.RunResult`, completed or not) and, per failed seed, why."""

    out_dir: Path
    summary: dict[str, Any]
    results: dict[int, Any] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every seed's run completed."""
        return self.summary.get("status") == "completed"


def seed_folder(parent: str | Path, seed: int) -> Path:
    """The run folder of `seed` under the multi-seed parent folder `parent`."""
    return Path(parent) / f"seed_{seed}"


def aggregate(summaries: Mapping[int, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean, sample std (ddof=1) and n of every scalar metric over the per-seed `summaries`.

    Metric names are those of `fedcl.reports.runfolder.scalar_metrics` (nested keys dotted).
    A metric counts over the seeds whose summary holds it as a finite number (n); std is None
    when n < 2. Each entry also keeps the per-seed values (``values``: seed -> value).
    """
    per_seed = {seed: scalar_metrics(summary) for seed, summary in summaries.items()}
    names = sorted({name for metrics in per_seed.values() for name in metrics})
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        values = {s: m[name] for s, m in per_seed.items() if name in m}
        array = np.array(list(values.values()), dtype=float)
        out[name] = {
            "mean": float(array.mean()),
            "std": float(array.std(ddof=1)) if len(array) > 1 else None,
            "n": len(array),
            "values": {str(s): v for s, v in values.items()},
        }
    return out


def seeds_summary(
    seeds: Sequence[int],
    summaries: Mapping[int, Mapping[str, Any]],
    failed: Mapping[int, str],
    *,
    name: str = "",
    interrupted: bool = False,
) -> dict[str, Any]:
    """The parent's summary.json: `summaries` holds the completed seeds' summaries, `failed` a
    one-line reason per failed seed; seeds in neither did not run (the command was interrupted).
    `status` is ``completed`` only when every seed completed."""
    not_run = [s for s in seeds if s not in summaries and s not in failed]
    if interrupted:
        status = "interrupted"
    elif failed or not_run:
        status = "failed"
    else:
        status = "completed"
    strategies = sorted({str(s.get("strategy")) for s in summaries.values() if s.get("strategy")})
    summary: dict[str, Any] = {
        "kind": SEEDS_KIND,
        "status": status,
        "name": name,
        "strategy": strategies[0] if len(strategies) == 1 else strategies or None,
        "seeds": list(seeds),
        "runs": {str(s): seed_folder("", s).name for s in seeds},
        "completed": [s for s in seeds if s in summaries],
        "failed": {str(s): failed[s] for s in seeds if s in failed},
        "not_run": not_run,
        "std": STD_NOTE,
        "metrics": aggregate(summaries),
    }
    if failed:
        summary["error"] = "; ".join(f"seed {s} failed: {failed[s]}" for s in seeds if s in failed)
    elif interrupted:
        summary["error"] = f"interrupted before seed {not_run[0]} completed"
    return summary


def write_seeds_summary(parent: str | Path, summary: Mapping[str, Any]) -> Path:
    """Write the parent's summary.json atomically (strict JSON: no NaN)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / SUMMARY
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, allow_nan=False))
    os.replace(tmp, path)
    return path


def run_seeds(
    config: Any = None,
    *overrides: str,
    seeds: Sequence[int],
    out: str | Path | None = None,
    progress: bool | None = None,
    **values: Any,
) -> SeedsResult:
    """Run the experiment once per seed; return the parent folder, its aggregate and each run.

    Arguments are `fedcl.run`'s (a config path, mapping or None; ``"key=value"`` overrides;
    dotted keys as Python values) with `seeds` in place of the config's ``seed``. The run of seed
    s is written to ``out/seed_<s>`` (default `out`: ``runs/<name>-<time>``); then
    ``out/summary.json`` gets the mean, sample std and n of every scalar metric over the seeds
    that completed (`aggregate`).

    Every seed's config and folder is checked before the first run: bad input raises a one-line
    `FedclError` and writes nothing. A seed whose run fails (it raises, or its summary says
    ``failed``) does not stop the others; the parent summary's ``status`` is then ``failed``,
    with ``failed`` naming each such seed and why (``result.ok`` is False). A Ctrl-C writes the
    parent summary with ``status: interrupted`` and raises KeyboardInterrupt. All runs share
    this process's Ray.
    """
    from fedcl.api import run
    from fedcl.config import load_config
    from fedcl.engine.loop import default_out_dir
    from fedcl.metrics.recorder import check_out_dir

    seeds = _check_seeds(seeds)
    if len(overrides) == 1 and not isinstance(overrides[0], str):
        overrides = tuple(overrides[0])  # run(config, ["k=v", ...]), as fedcl.run accepts
    if "seed" in values or any(o.split("=", 1)[0].strip() == "seed" for o in overrides):
        raise ConfigError("give the seeds with seeds=[...] (--seeds), not with the key 'seed'")
    cfgs = {s: load_config(config, overrides, {**values, "seed": s}) for s in seeds}
    parent = Path(out) if out is not None else default_out_dir(cfgs[seeds[0]])
    if is_seeds_parent(parent):
        raise FedclError(f"{parent} already holds a multi-seed run; choose another --out folder")
    check_out_dir(parent)
    for seed in seeds:
        check_out_dir(seed_folder(parent, seed))
    name = str(cfgs[seeds[0]].get("name", ""))

    results: dict[int, Any] = {}
    summaries: dict[int, dict[str, Any]] = {}
    failed: dict[int, str] = {}
    for seed in seeds:
        folder = seed_folder(parent, seed)
        try:
            result = run(config, *overrides, out=folder, progress=progress, **values, seed=seed)
        except KeyboardInterrupt:
            if summaries or failed or folder.exists():
                summary = seeds_summary(seeds, summaries, failed, name=name, interrupted=True)
                write_seeds_summary(parent, summary)
            raise
        except FedclError as exc:
            if not (summaries or failed or folder.exists()):
                raise  # bad input caught by the first run's own checks: nothing was written
            failed[seed] = _one_line(exc)
            continue
        except Exception as exc:  # a bug or a crash in one seed's run: the others still run
            failed[seed] = f"{type(exc).__name__}: {_one_line(exc)}"
            continue
        results[seed] = result
        if result.summary.get("status") == "completed":
            summaries[seed] = result.summary
        else:
            failed[seed] = str(result.summary.get("error") or "its summary.json says failed")
    summary = seeds_summary(seeds, summaries, failed, name=name)
    write_seeds_summary(parent, summary)
    return SeedsResult(parent, summary, results, failed)


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    if isinstance(seeds, str | bytes) or not isinstance(seeds, Sequence) or not seeds:
        raise ConfigError("seeds must be a non-empty list of integers, e.g. seeds=[0, 1, 2]")
    out = []
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise ConfigError(f"seeds must be integers, got {seed!r}")
        out.append(int(seed))
    repeated = sorted({s for s in out if out.count(s) > 1})
    if repeated:
        raise ConfigError(f"seeds must differ; repeated: {', '.join(map(str, repeated))}")
    return out


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def format_aggregate(metrics: Mapping[str, Mapping[str, Any]], name: str) -> str:
    """``mean ± std (n=k)`` of one aggregated metric, for messages; ``-`` when absent."""
    entry = metrics.get(name)
    if not entry:
        return "-"
    std = entry.get("std")
    spread = f" ± {std:.4g}" if std is not None and math.isfinite(std) else ""
    return f"{entry['mean']:.4g}{spread} (n={entry['n']})"
