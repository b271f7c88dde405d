"""Shared fixtures: one local Ray for the whole session (starting Ray costs seconds)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import ray

from fedcl.engine.pool import init_ray

# The examples are user code outside the package: importable as a user's PYTHONPATH would make
# them (set before Ray starts, so the actors get the same path).
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))


@pytest.fixture(scope="session", autouse=True)
def fedcl_cache(tmp_path_factory):
    """Generated datasets and vectorize probes cached in a folder of the test session only."""
    folder = tmp_path_factory.mktemp("fedcl-cache")
    previous = os.environ.get("FEDCL_CACHE")
    os.environ["FEDCL_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("FEDCL_CACHE", None)
    else:
        os.environ["FEDCL_CACHE"] = previous


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs, shared by every test that runs actors."""
    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()
