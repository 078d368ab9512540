"""Conversion of numpy scalars in public settings to Python numbers.

Settings often come from numpy arithmetic, such as ``np.float32(0.1)`` or
``np.int64(10)``. The settings' checks accept Python ``int`` and ``float``,
so the settings classes and `SecureFedAvg` pass their numbers through
`plain_number` first. A numpy bool stays as it is, so the checks still
reject it as a number.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def plain_number(value: Any) -> Any:
    """Return a numpy integer or floating-point scalar as a Python int or float.

    Every other value, numpy bools included, comes back unchanged.
    """
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


MAX_SETTING_DIGITS = 300
"""Most decimal digits of an integer setting; float64 ends at about 1.8e308."""


def plain_fields(instance: object, *names: str) -> None:
    """Replace numpy scalars in the named fields of a frozen dataclass.

    Raises:
        ValueError: If a field is an integer beyond the range of float64,
            which the checks that compare it with floats cannot handle.

    """
    for name in names:
        value = plain_number(getattr(instance, name))
        if isinstance(value, int) and abs(value) >= 10**MAX_SETTING_DIGITS:
            raise ValueError(
                f"{name} must be a number within the range of float64. Found an "
                f"integer of {len(str(abs(value)))} digits."
            )
        object.__setattr__(instance, name, value)
