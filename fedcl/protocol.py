"""The message keys fedcl's server and clients share (one place, so the two sides cannot drift).

Flower's own conventions (``server-round`` in a train config, ``num-examples`` in a reply's
metrics, ``partition-id`` in a node's config) and fedcl's additions. Each algorithm's own record
names live beside it, in ``strategies/<algorithm>/keys.py``.
"""

from __future__ import annotations

SERVER_ROUND = "server-round"  # ConfigRecord entry of every message: the round it belongs to
TASK = "task"  # ConfigRecord entry of a query (which task to read) and MetricRecord of replies
NUM_EXAMPLES = "num-examples"  # MetricRecord entry of a reply: examples behind it (weights)
PROXIMAL_MU = "proximal-mu"  # ConfigRecord entry sent by Flower's FedProx
PARTITION_ID = "partition-id"  # Context.node_config entry: the virtual client behind a node
NUM_PARTITIONS = "num-partitions"  # Context.node_config entry: how many virtual clients exist
METRICS = "metrics"  # the MetricRecord of fedcl's replies
ARRAYS = "arrays"  # the model's ArrayRecord in fedcl's train replies

# ConfigRecord in train replies holding the trained sample ids ("sample-ids", int64 bytes); the
# engine records it for the deletion audit and strips it before the strategy sees the reply.
AUDIT_KEY = "fedcl.audit"
AUDIT_SAMPLE_IDS = "sample-ids"
STATE_KEY = "fedcl"  # ConfigRecord in Context.state with fedcl's per-client bookkeeping

__all__ = [
    "ARRAYS",
    "AUDIT_KEY",
    "AUDIT_SAMPLE_IDS",
    "METRICS",
    "NUM_EXAMPLES",
    "NUM_PARTITIONS",
    "PARTITION_ID",
    "PROXIMAL_MU",
    "SERVER_ROUND",
    "STATE_KEY",
    "TASK",
]
