"""Starting (or joining) Ray quietly and sizing the actor pool from the resources it offers."""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from typing import Any

import ray

from fedcl.errors import ConfigError


def init_ray(address: str | None, *, verbose: bool = False, num_cpus: int | None = None) -> None:
    """Start a local Ray (with `num_cpus`, default all), or attach to `address`; reuse one already
    running in this process."""
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ray.init(**kwargs)


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
