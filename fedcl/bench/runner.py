"""`run_bench`: every engine on the same workloads, one after the other, each in its own process.

Per workload the data are generated once (fedcl's MNIST-1D loader, fedcl's client partition) and
handed to the reference loops and to Flower's engine; fedcl generates the same data itself inside
`fedcl.run`. The rows, in order: the lean loop, the naive loop, fedcl with one actor, fedcl with as
many actors as the machine fits (both sequential: `engine.vectorize=off`), fedcl vectorized
(`engine.vectorize=on`, when fedcl has that key) on as many actors, Flower's `run_simulation`.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcl.bench.measure import run_worker
from fedcl.bench.report import add_ratios, derive_row, machine_info, write_json
from fedcl.bench.workload import Workload, prepare_data, save_data


@dataclass(frozen=True)
class Engine:
    """One row kind: which worker runs it and how."""

    name: str
    kind: str  # worker engine: lean | naive | fedcl | flower
    label: str
    num_actors: int | None = None
    vectorize: str | None = None  # fedcl's engine.vectorize, where fedcl has that key

    def overrides(self, has_vectorize: bool) -> list[str]:
        """The fedcl overrides of this row."""
        if self.vectorize is None or not has_vectorize:
            return []
        return [f"engine.vectorize={self.vectorize}"]


ENGINES: tuple[Engine, ...] = (
    Engine("lean", "lean", "lean loop"),
    Engine("naive", "naive", "naive loop"),
    Engine("fedcl-1", "fedcl", "fedcl 1 actor", num_actors=1, vectorize="off"),
    Engine("fedcl", "fedcl", "fedcl all cores", vectorize="off"),
    Engine("fedcl-vectorized", "fedcl", "fedcl vectorized", vectorize="on"),
    Engine("flower", "flower", "Flower run_simulation"),
)
ENGINE_NAMES = tuple(engine.name for engine in ENGINES)


def bench_workloads(quick: bool, rounds: int | None = None, seed: int = 0) -> list[Workload]:
    """The workloads of the quick or the full benchmark (`rounds` overrides their round count).

    Full: MLP 40-256-256-10 at 100/10, 1k/50 and 10k/100 clients registered/sampled per round,
    and MLP 40-128-128-10 and the CNN at 1k/50. Quick: 20/5 clients, 3 rounds, the 256-wide MLP.
    """
    if quick:
        return [Workload(20, 5, "mlp256", rounds=rounds or 3, seed=seed)]
    sizes = [(100, 10, "mlp256"), (1000, 50, "mlp256"), (1000, 50, "mlp128"), (1000, 50, "cnn")]
    sizes.append((10000, 100, "mlp256"))
    return [
        Workload(n, k, model, rounds=rounds or 6, seed=seed, min_reference_updates=1000)
        for n, k, model in sizes
    ]


def vectorize_available() -> bool:
    """Whether fedcl's config has `engine.vectorize` (the vectorized engine)."""
    from fedcl.config import default_config

    return "vectorize" in default_config().engine


def fedcl_caches_datasets() -> bool:
    """Whether `fedcl.run` reads generated datasets from fedcl's on-disk cache (which the bench's
    own data preparation fills) rather than generating them again."""
    from fedcl.scenario import datasets

    cache_folder = getattr(datasets, "cache_folder", None)
    return cache_folder is not None and cache_folder() is not None


def _say(message: str, enabled: bool) -> None:
    if enabled:
        print(f"[bench] {message}", file=sys.stderr, flush=True)


def _run_row(
    engine: Engine,
    workload: Workload,
    data_folder: Path,
    generate_s: float,
    timeout_s: float,
    has_vectorize: bool,
    fedcl_overrides: list[str],
) -> dict[str, Any]:
    overrides = engine.overrides(has_vectorize)
    if engine.kind == "fedcl":
        overrides += fedcl_overrides
    request = {
        "engine": engine.kind,
        "workload": workload.to_dict(),
        "data": str(data_folder),
        "num_actors": engine.num_actors,
        "overrides": overrides,
    }
    run = run_worker(request, data_folder.parent / "workers", timeout_s=timeout_s)
    row: dict[str, Any] = {
        "workload_label": workload.label,
        "workload": workload.to_dict(),
        "engine": engine.kind,
        "name": engine.name,
        "label": engine.label,
        "overrides": request["overrides"],
        "ok": run.result is not None,
        "error": run.error,
        "elapsed_s": run.elapsed_s,
        "peak_rss_mib": run.memory.driver_actors_mib,
        "peak_rss_tree_mib": run.memory.tree_mib,
        "memory_samples": run.memory.samples,
    }
    if run.result is not None:
        row["cores"] = int(run.result["cores"])
        row.update(derive_row(engine.kind, run.result, workload.per_round, generate_s))
        row["raw"] = run.result
    return row


def _describe(row: dict[str, Any]) -> str:
    if not row["ok"]:
        return f"FAILED after {row['elapsed_s']:.1f} s: {row['error']}"
    text = (
        f"{row['elapsed_s']:.1f} s: {row['updates_per_s']:.0f} updates/s, "
        f"{row['round_s']:.3f} s/round, start-up {row['startup_s']:.1f} s"
    )
    reason = row["raw"].get("vectorize_reason")
    return f"{text} ({reason})" if reason else text


def run_bench(
    *,
    quick: bool = False,
    rounds: int | None = None,
    engines: Sequence[str] | None = None,
    seed: int = 0,
    out: str | Path | None = "bench.json",
    timeout_s: float | None = None,
    progress: bool = True,
    workloads: Sequence[str] | None = None,
    fedcl_overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the benchmark and return its report: `machine`, `settings`, `notes` and `rows`.

    `engines` picks rows by name (`ENGINE_NAMES`; default all), `workloads` workloads by
    `Workload.key` (default all); `out` is the JSON file written
    (None: none); `timeout_s` bounds each row's process (default 300 s quick, 3600 s full);
    progress goes to stderr. A row that fails is kept with `ok: false` and its error.
    `fedcl_overrides` ("key=value") go to every fedcl row after its own; they are checked
    against fedcl's config first (`ConfigError`, before anything runs).
    """
    chosen = [e for e in ENGINES if engines is None or e.name in engines]
    unknown = sorted(set(engines or ()) - set(ENGINE_NAMES))
    if unknown:
        valid = ", ".join(ENGINE_NAMES)
        raise ValueError(f"unknown engine(s) {', '.join(unknown)}; valid: {valid}")
    timeout = timeout_s or (300.0 if quick else 3600.0)
    fedcl_overrides = list(fedcl_overrides)
    if fedcl_overrides:
        from fedcl.config import load_config

        load_config(None, fedcl_overrides)  # a wrong key or value fails here, by name
    notes = [
        "Timings are wall-clock on a machine that may be shared: treat them as noisy.",
        "s/round: median of the rounds after the first; updates/s = clients per round / s/round.",
        "start-up: wall - rounds x s/round (Ray start, actors, node registration, first-round "
        "warm-up).",
        "MB/round: fedcl's measured (the pickled bytes that crossed between driver and actors); "
        "Flower's computed, model bytes x clients sampled x 2 (down and up).",
        "x lean·cores: updates/s / (lean loop updates/s x cores the row used).",
        "peak MiB: RSS of driver plus Ray actors, sampled every 0.2 s (shared pages counted in "
        "each process); peak_rss_tree_mib in the JSON adds Ray's own processes.",
        "fedcl and Flower evaluate the global model after every round (on max_test samples).",
    ]
    # Without a dataset cache fedcl.run generates the data again: that is taken out of start-up.
    regenerates = not fedcl_caches_datasets()
    notes.append(
        "fedcl generates the data set inside fedcl.run; its start-up excludes that, estimated by "
        "the bench's own generation of the same data (data_s)."
        if regenerates
        else "fedcl's start-up includes reading the data set from fedcl's dataset cache, which "
        "the bench's data preparation (data_s) filled."
    )
    has_vectorize = vectorize_available()
    if has_vectorize:
        notes.append("fedcl rows: engine.vectorize=off except 'fedcl vectorized' (on).")
    elif "fedcl-vectorized" in (e.name for e in chosen):
        chosen = [e for e in chosen if e.name != "fedcl-vectorized"]
        notes.append("fedcl vectorized: skipped, fedcl's config has no engine.vectorize yet.")
    if fedcl_overrides:
        notes.append(f"fedcl rows also: {' '.join(fedcl_overrides)} (--set).")
    available = bench_workloads(quick, rounds, seed)
    missing = sorted(set(workloads or ()) - {w.key for w in available})
    if missing:
        valid = ", ".join(w.key for w in available)
        raise ValueError(f"unknown workload(s) {', '.join(missing)}; valid: {valid}")
    picked = [w for w in available if workloads is None or w.key in workloads]
    report: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {
            "quick": quick,
            "rounds": rounds,
            "seed": seed,
            "engines": [e.name for e in chosen],
            "fedcl_overrides": fedcl_overrides,
            "workloads": [w.to_dict() for w in picked],
        },
        "notes": notes,
        "rows": [],
    }
    total = len(picked) * len(chosen)
    done = 0
    with tempfile.TemporaryDirectory(prefix="fedcl-bench-") as tmp:
        for index, workload in enumerate(picked):
            _say(f"{workload.label}: preparing {workload.num_samples} MNIST-1D samples", progress)
            data = prepare_data(workload)
            folder = Path(tmp) / f"workload-{index}" / "data"
            save_data(data, folder)
            for engine in chosen:
                done += 1
                _say(f"({done}/{total}) {workload.label}: {engine.label} ...", progress)
                generated = data.generate_s if regenerates else 0.0
                row = _run_row(
                    engine, workload, folder, generated, timeout, has_vectorize, fedcl_overrides
                )
                row["data_s"] = data.generate_s
                report["rows"].append(row)
                _say(
                    f"({done}/{total}) {workload.label}: {engine.label}: {_describe(row)}", progress
                )
            del data
    add_ratios(report["rows"])
    if out is not None:
        write_json(report, Path(out))
    return report
