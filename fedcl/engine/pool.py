"""Starting (or joining) Ray quietly and sizing the actor pool from the resources it offers."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import ray

from fedcl.errors import ConfigError, FedclError


def init_ray(address: str | None, *, verbose: bool = False, num_cpus: int | None = None) -> None:
    """Start a local Ray (with `num_cpus`, default all), or attach to `address`; reuse one already
    running in this process.

    Never leaves Ray half-started. A Ctrl-C during the start is held until Ray is up; Ray is then
    shut down and KeyboardInterrupt raised (a start cut short leaves processes that no shutdown
    finds). A second Ctrl-C cuts the start short; then, as when the start fails, Ray is shut
    down and the processes the start left are killed. A failed start raises a one-line
    `FedclError`.
    """
    if ray.is_initialized():
        return
    # Ray 2.60 warns about token auth on every local start; the warning is noise for a laptop run.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": verbose,
        "logging_level": logging.INFO if verbose else logging.ERROR,
        "configure_logging": True,
        # Workers import fedcl and user ClientApps from the driver's import path.
        "runtime_env": {"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}},
    }
    if address is not None:
        kwargs["address"] = address
    elif num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    before = {p.pid for p in _descendants()}
    try:
        with _sigint_held(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ray.init(**kwargs)
    except BaseException as exc:
        _stop_started(before)
        if not isinstance(exc, Exception) or isinstance(exc, FedclError):
            raise
        where = f"could not reach Ray at engine.ray_address={address!r}" if address else ""
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise FedclError(f"{where or 'Ray did not start'}: {reason}") from None


def shutdown_ray() -> None:
    """Disconnect from Ray and stop the Ray processes this process started, if any. A Ctrl-C
    meanwhile is ignored: a shutdown cut short is what leaves Ray processes behind."""
    with _sigint_handled(signal.SIG_IGN):
        ray.shutdown()


@contextlib.contextmanager
def ray_stopped_on_interrupt() -> Iterator[None]:
    """On KeyboardInterrupt in the block, shut down the Ray the block started (one that ran
    before it is left running), then let the interrupt go on."""
    running = ray.is_initialized()
    try:
        yield
    except KeyboardInterrupt:
        if not running:
            shutdown_ray()
        raise


def _descendants() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def _stop_started(before: set[int]) -> None:
    """Shut Ray down, then kill what remains of the processes started since `before` (pids):
    after a start cut short, Ray's shutdown does not know them all."""
    with _sigint_handled(signal.SIG_IGN):
        started = [p for p in _descendants() if p.pid not in before]
        ray.shutdown()
        for process in started:
            with contextlib.suppress(psutil.Error):
                process.terminate()
        _, alive = psutil.wait_procs(started, timeout=5)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()


@contextlib.contextmanager
def _sigint_handled(handler: Callable[..., Any] | int) -> Iterator[None]:
    """SIGINT goes to `handler` in the block. Only the main thread can set handlers, and one set
    outside Python cannot be put back: elsewhere the block runs as it is."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """A first Ctrl-C in the block is held and raised as KeyboardInterrupt when the block ends;
    a second one is raised at once."""
    held: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        if held:
            raise KeyboardInterrupt
        held.append(signum)

    with _sigint_handled(hold):
        yield
    if held:
        raise KeyboardInterrupt


def pool_size(num_cpus: float, num_gpus: float, requested: int | None) -> int:
    """How many actors to start: `requested`, or as many as the cluster's resources fit.

    Raises `ConfigError` when the resources cannot fit even one actor, or fewer than requested.
    """
    resources = ray.cluster_resources()
    limits = []
    if num_cpus > 0:
        limits.append(math.floor(resources.get("CPU", 0) / num_cpus + 1e-9))
    if num_gpus > 0:
        limits.append(math.floor(resources.get("GPU", 0) / num_gpus + 1e-9))
    fits = min(limits)
    have = f"{resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU"
    if fits < 1:
        raise ConfigError(
            f"no actor fits: each needs {num_cpus:g} CPU and {num_gpus:g} GPU, Ray has {have}"
        )
    if requested is None:
        return fits
    if requested > fits:
        raise ConfigError(
            f"engine.num_actors={requested} does not fit: Ray has {have}, each actor needs "
            f"{num_cpus:g} CPU and {num_gpus:g} GPU (at most {fits} actors)"
        )
    return requested
