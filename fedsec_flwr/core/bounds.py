"""Text of the numeric bounds that error messages quote.

A message such as "must be at least 3.87e-121" invites the caller to pass
3.87e-121. If the bound was rounded to the nearest short decimal, that
value can fall on the wrong side of it and be rejected by the same check.
These functions round a lower bound up and an upper bound down, so every
quoted bound is itself accepted.
"""

from __future__ import annotations

import math
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

BOUND_DIGITS = 4
"""Significant digits of a quoted bound."""


def lower_bound_text(value: float, *, digits: int = BOUND_DIGITS) -> str:
    """Return `value` rounded up to `digits` significant digits, as text."""
    return _rounded_text(value, digits=digits, rounding=ROUND_CEILING)


def upper_bound_text(value: float, *, digits: int = BOUND_DIGITS) -> str:
    """Return `value` rounded down to `digits` significant digits, as text."""
    return _rounded_text(value, digits=digits, rounding=ROUND_FLOOR)


def _rounded_text(value: float, *, digits: int, rounding: str) -> str:
    exact = Decimal(value)
    if not exact.is_finite() or exact.is_zero():
        return str(value)

    step = Decimal(1).scaleb(exact.adjusted() - digits + 1)
    rounded = float(exact.quantize(step, rounding=rounding))
    # The nearest float64 of the rounded decimal stays on the same side of
    # `value`, because `value` is itself a float64 and rounding is monotone.
    # Near the float64 maximum, rounding up overflows, so the exact value
    # is quoted instead.
    if math.isinf(rounded):
        return repr(value)
    return f"{rounded:.{digits}g}"
