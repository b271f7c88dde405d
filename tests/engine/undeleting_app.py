"""A ClientApp for tests: fedcl's default client, except that partition 0 ignores deletions.

Partition 0 always trains on the data it held in round 1, before any delete event: from the round
its samples are deleted on, it trains on them anyway (and its reply's audit ids say so).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedcl.client import app as default

app = ClientApp()
IGNORES_DELETIONS = 0


@app.train()
def train(msg: Message, context: Context) -> Message:
    if int(context.node_config["partition-id"]) == IGNORES_DELETIONS:
        # The handler holds its own copy of the message content: rewinding it changes nothing else.
        msg.content["config"]["server-round"] = 1
    return default.train(msg, context)
