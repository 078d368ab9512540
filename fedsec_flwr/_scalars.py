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


def plain_fields(instance: object, *names: str) -> None:
    """Replace numpy scalars in the named fields of a frozen dataclass."""
    for name in names:
        object.__setattr__(instance, name, plain_number(getattr(instance, name)))
