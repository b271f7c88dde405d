"""Actors load the compiled sums while the run starts, not in its first round, when their calls
will use them; otherwise numba is never imported."""

from __future__ import annotations

import sys

import pytest
import ray

from fedcl.config import load_config, to_container
from fedcl.engine.actor import ActorFactory, kill_actors
from fedcl.engine.replies import COMPILED_FROM
from fedcl.scenario.builder import build_scenario
from fedcl.scenario.datasets import load_dataset


def _loaded_in(actor: ray.actor.ActorHandle) -> bool:
    return ray.get(actor.__ray_call__.remote(lambda _: "fedcl.engine.sum_kernels" in sys.modules))


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize(("call_elements", "loaded"), [(COMPILED_FROM, True), (0, False)])
def test_actors_load_the_compiled_sums_at_start_when_their_calls_will_use_them(
    call_elements, loaded
):
    cfg = load_config(None, ["dataset.name=gaussian", "clients.num=4", "scenario.num_tasks=1"])
    data = load_dataset("gaussian", seed=0)
    factory = ActorFactory.create(
        to_container(cfg),
        build_scenario(cfg, data),
        data.x_train,
        data.y_train,
        data.input_shape,
        data.num_classes,
        run_id=3,
        call_elements=call_elements,
    )
    actors = factory.start(1)
    try:
        assert _loaded_in(actors[0]) is loaded
    finally:
        kill_actors(actors)
