"""A ClientApp for tests: fedcl's default client, except for a few clients that misbehave.

partition 3 raises; partition 4 replies with NaN weights; partition 5 replies with a wrongly shaped
head. Everyone else trains normally.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedcl.client import app as default

app = ClientApp()
RAISES, NAN, MISSHAPEN = 3, 4, 5


@app.train()
def train(msg: Message, context: Context) -> Message:
    partition = int(context.node_config["partition-id"])
    if partition == RAISES:
        raise RuntimeError("this client is broken")
    reply = default.train(msg, context)
    if partition in (NAN, MISSHAPEN):
        arrays = reply.content["arrays"]
        values = {name: arrays[name].numpy() for name in arrays}
        if partition == NAN:
            values["head.weight"] = np.full_like(values["head.weight"], np.nan)
        else:
            values["head.weight"] = values["head.weight"][:, :-1]
        arrays = ArrayRecord({name: Array(value) for name, value in values.items()})
        content = RecordDict({"arrays": arrays, "metrics": reply.content["metrics"]})
        return Message(content, reply_to=msg)
    return reply
