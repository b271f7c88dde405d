"""`fedcl bench`: fedcl's throughput, start-up, memory and traffic against two in-process
references (the lean loop, the compute limit on one core, and the naive loop a researcher writes)
and against Flower's own simulation engine, on the same data and workload, in one invocation.

Modules: `workload` (what is trained, on which data), `loops` (the lean and naive loops),
`flower_app` (the workload as a Flower app), `worker` (one row in its own process), `measure`
(running a worker, sampling its memory), `report` (figures, JSON, table), `runner` (`run_bench`),
`cli` (`fedcl bench` arguments).
"""

from __future__ import annotations

from typing import Any


def run_bench(**kwargs: Any) -> dict[str, Any]:
    """Run the benchmark and return its report; see `fedcl.bench.runner.run_bench`."""
    from fedcl.bench.runner import run_bench as _run_bench

    return _run_bench(**kwargs)


__all__ = ["run_bench"]
