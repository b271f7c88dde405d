"""A ClientApp for tests: fedcl's default client, except partition 1, which is slow in round 1."""

from __future__ import annotations

import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedcl.client import app as default

app = ClientApp()
SLOW, DELAY_S = 1, 3.0


@app.train()
def train(msg: Message, context: Context) -> Message:
    slow = int(context.node_config["partition-id"]) == SLOW
    if slow and int(msg.content["config"]["server-round"]) == 1:
        time.sleep(DELAY_S)
    return default.train(msg, context)
