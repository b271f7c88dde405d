"""Unlearning methods named by import path in the tests (`unlearning.method=tests...`)."""

from __future__ import annotations

from fedcl.unlearning import UnlearningContext


def explode(context: UnlearningContext) -> None:
    """A method that fails."""
    raise RuntimeError("planted failure\nsecond line")
