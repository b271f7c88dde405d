"""Hypothesis settings for the property tests: few examples, derandomized, no example database, so
that every CI run checks the same cases in about the same time."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "fedcl",
    max_examples=30,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile("fedcl")
