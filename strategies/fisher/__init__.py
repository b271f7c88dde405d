"""Fisher-weighted merging: the strategy (`strategy`), its client half (`client`), the equations
(`math`) and the message keys both halves share (`keys`)."""

from fedcl.strategies.fisher.strategy import FisherMerging

__all__ = ["FisherMerging"]
