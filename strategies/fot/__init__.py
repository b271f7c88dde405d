"""Federated Orthogonal Training: the strategy (`strategy`), its client half (`client`), the
paper's equations (`math`) and the message keys both halves share (`keys`)."""

from fedcl.strategies.fot.strategy import FOT

__all__ = ["FOT"]
