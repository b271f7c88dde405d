"""Scenario tests cache generated datasets in a temporary folder, never in the user's home."""

from __future__ import annotations

import pytest

from fedcl.scenario.datasets import CACHE_ENV


@pytest.fixture(autouse=True)
def _dataset_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path_factory.getbasetemp() / "dataset-cache"))
