"""Prototype averaging (Federated Reconnaissance): the strategy (`strategy`), its client half
(`client`), the prototype banks (`math`) and the message keys both halves share (`keys`)."""

from fedcl.strategies.prototypes.strategy import PrototypeAveraging

__all__ = ["PrototypeAveraging"]
