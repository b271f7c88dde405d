"""How numbers and config values are written in tables (compare's Markdown, the HTML report)."""

from __future__ import annotations

import math
from typing import Any


def fmt(value: float | None) -> str:
    """A number for a table: integers plain, others with 4 decimals (2 from 10 on); ``-`` for
    None or a value that is not finite."""
    if value is None or not math.isfinite(value):
        return "-"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    text = f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    # A tiny negative rounds to "-0.0000": a sign the number shown does not have.
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def show(value: Any) -> str:
    """A config value for a table: lists bracketed, None as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)
