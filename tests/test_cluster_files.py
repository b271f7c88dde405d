"""Cluster launcher files pass the installed Ray's schema and install fedcl with an extra that
brings ray[default] at the pinned Ray; submit.py attaches to a cluster."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def project() -> dict:
    """pyproject.toml's [project] table."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def extra_requirements(extra: str) -> list[str]:
    """What `pip install fedcl[extra]` brings beyond fedcl's dependencies, `fedcl[...]` unfolded."""
    extras = project()["optional-dependencies"]
    found = []
    for requirement in extras[extra]:
        nested = re.fullmatch(r"fedcl\[(\w+)\]", requirement)
        found += extra_requirements(nested.group(1)) if nested else [requirement]
    return found


def test_the_cluster_extra_brings_ray_default_at_the_pinned_ray_version():
    pin = next(d for d in project()["dependencies"] if re.match(r"ray\s*==", d))
    version = pin.split("==")[1].strip()
    for extra in ("cluster", "aws", "test"):
        assert f"ray[default]=={version}" in extra_requirements(extra), extra
    assert any(r.startswith("boto3") for r in extra_requirements("aws"))


@pytest.mark.parametrize(("name", "extra"), [("local.yaml", "cluster"), ("aws.yaml", "aws")])
def test_launcher_file_installs_fedcl_with_its_extra_on_every_node(name, extra):
    config = yaml.safe_load((CLUSTER / name).read_text())
    assert "~/fedcl" in config["file_mounts"]
    installs = " && ".join(config["setup_commands"])
    assert f'pip install -q -e "$HOME/fedcl[{extra}]"' in installs


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
