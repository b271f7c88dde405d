"""The `ray job submit` route of cluster/README.md runs a short simulation on a head this test
starts (`ray start --head` on free ports, in a temporary folder) and leaves the run folder."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
BIN = Path(sys.executable).parent  # the environment's `ray` and `fedcl` scripts


def _missing_jobs_deps() -> str | None:
    """Why Ray's jobs CLI cannot run here, or None when it can."""
    try:
        # What Ray itself imports to decide whether the dashboard and jobs API start.
        importlib.import_module("ray.dashboard.optional_deps")
    except ImportError as exc:
        return f"ray[default] is missing ({exc.name}): pip install -e '.[cluster]'"
    if not (BIN / "ray").exists() or not (BIN / "fedcl").exists():
        return f"the ray and fedcl scripts are not in {BIN}"
    return None


pytestmark = pytest.mark.skipif(_missing_jobs_deps() is not None, reason=str(_missing_jobs_deps()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    """A running `ray start --head`: its dashboard address and the environment to reach it."""

    dashboard: str
    env: dict[str, str]
    folder: Path


def _stop(head: subprocess.Popen, grace_s: float = 3.0) -> None:
    """Stop the head's processes, and only them (`ray stop` would stop every Ray on the
    machine): SIGTERM to the `ray start` process and all its descendants, SIGKILL after
    `grace_s`."""
    try:
        root = psutil.Process(head.pid)
        # Listed before any signal: a dying raylet's workers are re-parented out of the tree.
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    head.wait(timeout=grace_s)


def _wait_for_dashboard(url: str, head: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # it answers (401 without a token): it is up
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"no dashboard at {url} after {timeout_s:g} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def ray_head() -> Iterator[Head]:
    """`ray start --head` with token authentication (Ray 2.60's default), every port free-picked."""
    # Short and under /tmp: Ray's socket paths inside it must stay under 108 characters.
    folder = Path(tempfile.mkdtemp(prefix="fedcl-job-", dir="/tmp"))
    env = {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),  # this head's own, not ~/.ray's
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    dashboard_port = _free_port()
    ports = {
        "--port": _free_port(),
        "--dashboard-port": dashboard_port,
        "--dashboard-agent-listen-port": _free_port(),
        "--ray-client-server-port": _free_port(),
        "--metrics-export-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
    }
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        "--num-cpus=2",
        "--object-store-memory=200000000",  # a small neighbour to the test session's own Ray
        f"--temp-dir={folder / 'ray'}",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]
    log = folder / "head.log"
    with log.open("wb") as out:
        head = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_dashboard(dashboard, head, log, timeout_s=60)
        yield Head(dashboard, env, folder)
    finally:
        _stop(head)
        shutil.rmtree(folder, ignore_errors=True)


def documented_route() -> list[str]:
    """The `ray job submit` command line of cluster/README.md, as arguments."""
    lines = (CLUSTER / "README.md").read_text().splitlines()
    return shlex.split(next(line for line in lines if line.strip().startswith("ray job submit")))


@pytest.mark.slow  # starts a Ray head with its dashboard: outside CI (-m slow)
def test_ray_job_submit_runs_a_simulation_on_the_head(ray_head):
    args = documented_route()
    assert args[args.index("--working-dir") + 1] == "."
    assert args[args.index("--") + 1 :][:2] == ["fedcl", "run"]
    out = ray_head.folder / "run"
    args[args.index("--address") + 1] = ray_head.dashboard
    args[args.index("--out") + 1] = str(out)
    short = ["rounds=2", "clients.num=4", "scenario.num_tasks=2", "engine.num_actors=1", "--quiet"]
    done = subprocess.run(
        [str(BIN / "ray"), *args[1:], *short],
        cwd=REPO,
        env=ray_head.env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    log = done.stdout[-4000:] + done.stderr[-4000:]
    assert done.returncode == 0, log
    assert "succeeded" in done.stdout, log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
