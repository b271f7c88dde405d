"""A ClientApp for tests: fedcl's default client, except that partition 1 waits at a gate.

When a train message's config names a gate (`GATE_KEY`: the name of a `Gate` actor), partition 1
blocks until the test opens it: its reply is late for certain, whatever the machine's load, and
comes when the test says so. Everyone else trains normally.
"""

from __future__ import annotations

import asyncio

import ray
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedcl.client import app as default

app = ClientApp()
GATED, GATE_KEY = 1, "test-gate"
MAX_WAIT_S = 300.0  # a forgotten gate must not hang an actor forever


@ray.remote(num_cpus=0)
class Gate:
    """An event clients can wait on, opened by the test."""

    def __init__(self) -> None:
        self._open = asyncio.Event()

    async def wait(self) -> None:
        await self._open.wait()

    async def open(self) -> None:
        self._open.set()


@app.train()
def train(msg: Message, context: Context) -> Message:
    gate = msg.content["config"].get(GATE_KEY)
    if gate is not None and int(context.node_config["partition-id"]) == GATED:
        ray.get(ray.get_actor(str(gate)).wait.remote(), timeout=MAX_WAIT_S)
    return default.train(msg, context)
