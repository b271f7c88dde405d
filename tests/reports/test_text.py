"""Numbers in the report and compare tables."""

from __future__ import annotations

import math

import pytest

from fedcl.reports.text import fmt


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (3, "3"),
        (0.12345, "0.1235"),
        (12.345, "12.35"),
        (-0.25, "-0.2500"),
        (-7.4e-06, "0.0000"),  # rounds to zero: no sign left on it
        (-0.0, "0"),
        (None, "-"),
        (math.nan, "-"),
    ],
)
def test_numbers_are_shown_as_rounded_without_a_sign_on_zero(value, shown):
    assert fmt(value) == shown
