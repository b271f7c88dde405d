"""A fedcl run on a two-node Ray cluster (`ray.cluster_utils.Cluster`, started here) that loses
the node of client actor 0 before round `kill_round`. Run by a test in its own process (the test
session has its local Ray already):

    python -m tests.engine.two_node_run OUT_DIR OVERRIDE...

The nodes: a head without CPUs (the driver and the object store copy of the data live there)
and two workers with two CPUs each, so the survivor has room for the lost node's actors.
"""

from __future__ import annotations

import sys

import ray
from ray.cluster_utils import Cluster

import fedcl
from tests.engine import actor_killer

# Ray notices a lost node by missed health checks: every 0.5 s, two missed, instead of ~30 s.
FAST_HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 2,
}


def main(out_dir: str, overrides: list[str]) -> None:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "_system_config": FAST_HEALTH_CHECKS},
    )
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        actor_killer.CLUSTER = cluster
        fedcl.run(None, [*overrides, f"engine.ray_address={cluster.address}"], out=out_dir)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
