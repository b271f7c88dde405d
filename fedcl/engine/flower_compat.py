"""The few Flower 1.41 internals a custom Grid has to touch, kept in one place (flwr is pinned).

- `Message(...)` reads the process's `TaskIdentity`, which must be set before any message is built.
- Message ids are assigned by whoever transports messages (the SuperLink, or here our Grid).
- A `Run` record backs `Grid.run`.
- Copying a message's content cheaply reaches into Flower's record dicts (`_data`).
"""

from __future__ import annotations

import copy
from uuid import uuid4

from flwr.app import ArrayRecord, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

# Re-exported: the engine's reply screening decodes replies through this module.
from fedcl.npy import DecodedArray as DecodedArray
from fedcl.npy import decoded as decoded

# Node ids 0 and SUPERLINK_NODE_ID (1) are reserved by Flower; ours are FIRST_NODE_ID + partition.
FIRST_NODE_ID = 1000


def node_id_of(partition_id: int) -> int:
    """The deterministic Flower node id of virtual client `partition_id` (or an array of ids)."""
    return FIRST_NODE_ID + partition_id


def partition_of(node_id: int) -> int:
    """The virtual client (partition id) behind Flower node `node_id`."""
    return node_id - FIRST_NODE_ID


def set_server_identity(run_id: int, task_id: int = 1) -> None:
    """Let this process build Flower messages as the server of run `run_id`."""
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    TaskIdentity.task_id = task_id


def make_run(run_id: int) -> Run:
    """An empty Flower `Run` record for `run_id`."""
    return Run.create_empty(run_id)


def assign_message_id(message: Message) -> str:
    """Give `message` a fresh unique id, as the SuperLink does on push; return it."""
    message_id = str(uuid4())
    message.metadata.__dict__["_message_id"] = message_id
    return message_id


def error_reply(message: Message, reason: str, *, crashed: bool = False) -> Message:
    """A Flower error reply to `message` (strategies count these as failures)."""
    code = ErrorCode.CLIENT_APP_CRASHED if crashed else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    reply = Message(Error(code=code, reason=reason), reply_to=message)
    assign_message_id(reply)
    return reply


def own_copy(content: RecordDict) -> RecordDict:
    """A copy of `content` a handler may change freely without touching the original, made
    without copying array bytes: each ArrayRecord gets its own mapping of the same (immutable)
    `Array` objects; config and metric records are deep-copied (they are small)."""
    copied = RecordDict()
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            shallow = copy.copy(record)
            shallow.__dict__["_data"] = dict(record.__dict__["_data"])
            copied[name] = shallow
        else:
            copied[name] = copy.deepcopy(record)
    return copied
