"""Shared fixtures: one local Ray for the whole session (starting Ray costs seconds)."""

from __future__ import annotations

import pytest
import ray

from fedcl.engine.pool import init_ray


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs, shared by every test that runs actors."""
    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()
