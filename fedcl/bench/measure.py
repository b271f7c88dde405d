"""Running one benchmark row in a child process while sampling the memory of its process tree.

The child is `python -m fedcl.bench.worker`; every `interval_s` a thread sums the resident set
size (RSS) of the child and all its descendants (the local Ray it starts: GCS, raylet, workers).
"Driver plus actors" counts the child and Ray's worker processes running an actor (named
`ray::<Actor>...`; idle workers and Ray's agents are left out); "tree" counts every process.
RSS counts shared pages (Ray's object store, torch's libraries) once per process that maps them,
so both figures are upper bounds.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

_MIB = 1024 * 1024
# Ray processes named ray::... that are Ray's own, not an actor.
_RAY_OWN = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")


def is_actor_process(name: str) -> bool:
    """Whether a process named `name` is a Ray worker running an actor or task."""
    return name.startswith("ray::") and not name.startswith(_RAY_OWN)


@dataclass
class TreeMemory:
    """Peak memory of a process tree, sampled."""

    driver_actors_mib: float = 0.0
    tree_mib: float = 0.0
    samples: int = 0
    seen: dict[int, float] = field(default_factory=dict)  # pid -> create time, for clean-up


class TreeSampler(threading.Thread):
    """Samples the RSS of process `pid` and its descendants until stopped."""

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.memory = TreeMemory()
        self._stop_event = threading.Event()

    def sample(self) -> None:
        """Take one sample: sum RSS over the tree, keep the peaks."""
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        driver_actors = tree = 0
        for process in processes:
            try:
                rss = process.memory_info().rss
                name = process.name()
                self.memory.seen.setdefault(process.pid, process.create_time())
            except psutil.Error:
                continue
            tree += rss
            if process.pid == self.root.pid or is_actor_process(name):
                driver_actors += rss
        self.memory.samples += 1
        self.memory.driver_actors_mib = max(self.memory.driver_actors_mib, driver_actors / _MIB)
        self.memory.tree_mib = max(self.memory.tree_mib, tree / _MIB)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval_s)

    def stop(self) -> TreeMemory:
        """Stop sampling and return the peaks."""
        self._stop_event.set()
        self.join()
        return self.memory


@dataclass
class WorkerRun:
    """What a worker process gave back: its result (None on failure), memory, time, log tail."""

    result: dict[str, Any] | None
    memory: TreeMemory
    elapsed_s: float
    error: str | None = None


def _stop_leftovers(seen: dict[int, float], grace_s: float = 5.0) -> None:
    """Terminate processes the worker started that outlived it (e.g. a Ray it could not stop).

    Only pids seen in the worker's tree, and only if still the same process (same create time).
    """
    deadline = time.monotonic() + grace_s
    left: list[psutil.Process] = []
    for pid, created in seen.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == created:
                left.append(process)
        except psutil.Error:
            continue
    while left and time.monotonic() < deadline:
        left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.terminate()


def worker_env() -> dict[str, str]:
    """The environment of a worker: a fresh local Ray of its own, Flower's telemetry off."""
    env = dict(os.environ)
    env["RAY_ADDRESS"] = "local"  # never attach to a Ray someone else started on this machine
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env.setdefault("RAY_DEDUP_LOGS", "1")
    return env


def run_worker(
    request: dict[str, Any], workdir: Path, *, timeout_s: float, interval_s: float = 0.2
) -> WorkerRun:
    """Run `request` in `python -m fedcl.bench.worker`, sampling its memory; never raises for a
    failed or timed-out worker (the error and the log's tail come back instead)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", suffix=".json", dir=workdir, delete=False
    ) as request_file:
        result_path = Path(request_file.name).with_suffix(".result.json")
        json.dump({**request, "result": str(result_path)}, request_file)
    log_path = Path(request_file.name).with_suffix(".log")
    started = time.perf_counter()
    with log_path.open("w") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "fedcl.bench.worker", request_file.name],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=worker_env(),
        )
        sampler = TreeSampler(child.pid, interval_s)
        sampler.start()
        error = None
        try:
            code = child.wait(timeout=timeout_s)
            if code != 0:
                error = f"worker exited with code {code}"
        except subprocess.TimeoutExpired:
            sampler.sample()
            error = f"worker timed out after {timeout_s:g} s"
            for process in reversed([sampler.root, *_children(sampler.root)]):
                with contextlib.suppress(psutil.Error):
                    process.kill()
            child.wait()
        memory = sampler.stop()
    elapsed = time.perf_counter() - started
    _stop_leftovers(memory.seen)
    result = None
    if error is None and result_path.is_file():
        result = json.loads(result_path.read_text())
    elif error is None:
        error = "worker wrote no result"
    if error is not None:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        error = error + "\n" + "\n".join(tail)
    return WorkerRun(result, memory, elapsed, error)


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []
