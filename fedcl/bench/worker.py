"""One benchmark row in its own process: `python -m fedcl.bench.worker REQUEST.json`.

The request names the engine (`lean`, `naive`, `fedcl`, `flower`), the workload, the data folder
and where to write the result. Each engine runs in a fresh process so that no two share Ray state
(fedcl and Flower both start and stop a local Ray) and so that the parent can measure the peak
memory of this process and everything it starts. The result is raw timings; `fedcl.bench.report`
derives the figures.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedcl.bench.workload import Workload, build_bench_model, load_data, sample_clients


def _model_bytes(state: dict[str, Any]) -> int:
    return int(sum(value.numel() * value.element_size() for value in state.values()))


def _warm_up_torch() -> None:
    """Pay torch's one-time lazy imports (the first optimizer costs about a second) up front."""
    import torch

    weight = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([weight], lr=0.1)
    weight.sum().backward()
    optimizer.step()


def run_reference(kind: str, workload: Workload, data_folder: Path) -> dict[str, Any]:
    """The lean or naive loop for `workload.reference_rounds()` rounds on one thread."""
    import torch

    from fedcl.bench.loops import LeanLoop, NaiveLoop

    torch.set_num_threads(1)
    data = load_data(data_folder)
    _warm_up_torch()
    started = time.perf_counter()
    model = build_bench_model(workload, data.input_shape, data.num_classes)
    if kind == "lean":
        x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
        loop: LeanLoop | NaiveLoop = LeanLoop(
            model, x, y, batch_size=workload.batch_size, lr=workload.lr, epochs=workload.epochs
        )
    else:
        loop = NaiveLoop(
            model,
            data.x,
            data.y,
            batch_size=workload.batch_size,
            lr=workload.lr,
            epochs=workload.epochs,
        )
    rounds = workload.reference_rounds()
    round_s, sampled = [], []
    for server_round in range(1, rounds + 1):
        clients = sample_clients(workload, server_round)
        round_started = time.perf_counter()
        loop.run_round(clients)
        round_s.append(time.perf_counter() - round_started)
        sampled.append(len(clients))
    return {
        "rounds": rounds,
        "round_s": round_s,
        "sampled": sampled,
        "wall_s": time.perf_counter() - started,
        "cores": 1,
        "model_bytes": _model_bytes(loop.global_state()),
    }


def run_fedcl(workload: Workload, num_actors: int | None, overrides: list[str]) -> dict[str, Any]:
    """fedcl through its public Python API, `fedcl.run`, in a throw-away run folder."""
    import ray

    import fedcl
    from fedcl.bench.workload import fedcl_config

    with tempfile.TemporaryDirectory(prefix="fedcl-bench-") as folder:
        # A list of overrides (not unpacked): fedcl.run takes it in its old and new signatures.
        result = fedcl.run(
            fedcl_config(workload, num_actors), overrides, out=Path(folder) / "run", progress=False
        )
    ray.shutdown()
    summary, records = result.summary, result.records
    arrays = result.arrays
    model_bytes = sum(arrays[key].numpy().nbytes for key in arrays) if arrays is not None else 0
    return {
        "rounds": len(records),
        "round_s": [float(r["round_s"]) for r in records],
        "sampled": [int(r["replies"]) for r in records],
        "wall_s": float(summary["wall_s"]),
        "loop_s": float(summary["loop_s"]),
        "client_updates": int(summary["client_updates"]),
        "cores": int(summary["num_actors"]),
        "model_bytes": int(model_bytes),
        "bytes_moved": [
            int(r["bytes_sent"]) + int(r["bytes_received"])
            for r in records
            if "bytes_sent" in r and "bytes_received" in r
        ],
        "final_acc": float(summary.get("acc", float("nan"))),
        # Where fedcl has engine.vectorize: how it resolved it (auto/on may fall back to off).
        "vectorized": summary.get("vectorized"),
        "vectorize_reason": summary.get("vectorize_reason"),
    }


def run_flower(workload: Workload, data_folder: Path) -> dict[str, Any]:
    """Flower's `run_simulation` (Ray backend, one CPU per ClientApp actor) on the workload."""
    import logging
    import warnings

    from flwr.simulation import run_simulation

    from fedcl.bench import flower_app

    flower_app.configure(workload, data_folder)
    backend_config = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=flower_app.server_app,
            client_app=flower_app.client_app,
            num_supernodes=workload.num_clients,
            backend_config=backend_config,
        )
    returned = time.perf_counter()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    results = flower_app.RESULTS
    marks = results.get("marks", [])
    if len(marks) != workload.rounds + 1:
        raise RuntimeError(
            f"Flower's ServerApp recorded {len(marks)} evaluations, expected {workload.rounds + 1}"
            " (did the simulation fail? see the log above)"
        )
    round_s = [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]
    return {
        "rounds": workload.rounds,
        "round_s": round_s,
        "sampled": [workload.per_round] * workload.rounds,
        "wall_s": results["end"] - started,  # until the ServerApp finished
        "teardown_s": returned - results["end"],  # Flower stopping its actors and Ray
        "cores": int(results["cpus"] or 0),
        "model_bytes": int(results["model_bytes"]),
    }


def run_request(request: dict[str, Any]) -> dict[str, Any]:
    """Run the row `request` describes and return its raw measurements."""
    workload = Workload.from_dict(request["workload"])
    kind = request["engine"]
    data_folder = Path(request["data"])
    if kind in ("lean", "naive"):
        return run_reference(kind, workload, data_folder)
    if kind == "fedcl":
        return run_fedcl(workload, request.get("num_actors"), list(request.get("overrides", [])))
    if kind == "flower":
        return run_flower(workload, data_folder)
    raise ValueError(f"unknown engine {kind!r}")


def main(argv: list[str] | None = None) -> int:
    """Read the request file named on the command line, run it, write the result file."""
    args = sys.argv[1:] if argv is None else argv
    request = json.loads(Path(args[0]).read_text())
    result = run_request(request)
    Path(request["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
