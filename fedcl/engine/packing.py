"""What crosses between the driver and the actors, as bytes we pickle ourselves.

Ray would serialize the actor calls' arguments and results with cloudpickle and its own framing:
for the many small objects of a round (message metadata, reply stubs with their records) that
costs over ten times what the standard pickle does (0.38 ms against 0.02 ms for 25 messages'
metadata), on the driver and on every actor. Handed bytes, Ray only copies them. The bytes are
also exactly what the round moved: their lengths are the traffic fedcl reports.
"""

from __future__ import annotations

import pickle
from typing import Any


def pack(value: Any) -> bytes:
    """`value` as bytes (pickle protocol 5)."""
    return pickle.dumps(value, protocol=5)


def unpack(packed: bytes) -> Any:
    """The value `pack` made `packed` of."""
    return pickle.loads(packed)
