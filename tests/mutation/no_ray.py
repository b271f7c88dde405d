"""pytest plugin for the mutation runs (`tests/mutation/run.sh`): deselects every test that needs
Ray (the `ray_session` fixture, directly or through another fixture), so that each mutant runs only
the fast, in-process tests of its module."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    needs_ray = [item for item in items if "ray_session" in getattr(item, "fixturenames", ())]
    if needs_ray:
        config.hook.pytest_deselected(items=needs_ray)
        items[:] = [item for item in items if item not in needs_ray]
