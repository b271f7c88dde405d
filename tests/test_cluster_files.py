"""Cluster launcher files pass the installed Ray's schema; submit.py attaches to a cluster."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


@pytest.mark.parametrize("name", ["local.yaml", "aws.yaml"])
def test_launcher_file_passes_ray_schema(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    validate_config(prepare_config(config))


def test_submit_script_attaches_to_the_running_cluster():
    spec = importlib.util.spec_from_file_location("submit", CLUSTER / "submit.py")
    submit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(submit)
    assert submit.cluster_argv(["c.yaml", "rounds=3"]) == [
        "run",
        "c.yaml",
        "rounds=3",
        "engine.ray_address=auto",
    ]
    given = ["c.yaml", "engine.ray_address=ray://h:10001"]
    assert submit.cluster_argv(given) == ["run", *given]
