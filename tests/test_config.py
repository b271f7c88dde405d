"""Config loading: YAML, mappings and overrides layer over the defaults; errors are one line."""

from __future__ import annotations

import pytest

from fedcl.config import load_config, to_yaml
from fedcl.errors import ConfigError


def test_mapping_then_overrides_over_defaults():
    cfg = load_config(
        {"rounds": 7, "train": {"lr": 0.2}, "strategy": {"name": "fedprox"}},
        ["train.lr=0.3", "strategy.proximal_mu=0.1"],
    )
    assert cfg.rounds == 7 and cfg.train.lr == 0.3 and cfg.train.epochs == 1
    assert dict(cfg.strategy) == {"name": "fedprox", "proximal_mu": 0.1}
    assert "rounds: 7" in to_yaml(cfg)


def test_yaml_file_with_unknown_key_names_it(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("rounds: 5\nclients:\n  nmu: 3\n")
    with pytest.raises(
        ConfigError, match=r"unknown config key 'clients.nmu' \(did you mean 'clients.num'\?\)"
    ):
        load_config(path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rounds"], "is not of the form key=value"),
        (["clients.participation=0"], "clients.participation must be in (0, 1]"),
        (["engine.num_actors=0"], "engine.num_actors must be >= 1"),
        (["scenario.blurry=2"], "scenario.blurry must be in [0, 1]"),
        (["strategy.name=null"], "set strategy.name"),
    ],
)
def test_bad_values_are_refused(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert message in str(error.value) and "\n" not in str(error.value)
