"""Entry script for `ray submit`: runs `fedcl run` on the cluster's head, attached to the cluster.

    ray submit cluster/local.yaml cluster/submit.py -- ~/fedcl/simulations/quickstart.yaml rounds=50

`ray submit` copies only this file to the head node, so fedcl itself must be installed there (the
launcher files do it through `file_mounts` and `setup_commands`). Extra arguments are those of
`fedcl run`; `engine.ray_address=auto` is added unless given.
"""

from __future__ import annotations

import sys

from fedcl.cli import main


def cluster_argv(argv: list[str]) -> list[str]:
    """`fedcl run` arguments for a cluster run: attach to the running cluster by default."""
    args = ["run", *argv]
    if not any(a.startswith("engine.ray_address=") for a in argv):
        args.append("engine.ray_address=auto")
    return args


if __name__ == "__main__":
    sys.exit(main(cluster_argv(sys.argv[1:])))
