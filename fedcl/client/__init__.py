"""The client side a strategy's client half is written against (everything else here is private).

- `current_runtime()`: the actor's shared, read-only simulation context (scenario, data, model
  recipe, seed); per-client state lives in each node's `Context.state`.
- `read_query`, `QueryInput`: unpack a query message into the model, config, task and data.
- `single_record`, `model_record`, `client_of`, `to_array_record`: small message helpers.
"""

from fedcl.client.messages import (
    QueryInput,
    client_of,
    model_record,
    read_query,
    single_record,
    to_array_record,
)
from fedcl.client.runtime import ClientRuntime, current_runtime

__all__ = [
    "ClientRuntime",
    "QueryInput",
    "client_of",
    "current_runtime",
    "model_record",
    "read_query",
    "single_record",
    "to_array_record",
]
