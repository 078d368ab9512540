"""L2 clipping of model updates.

A model update is a sequence of NumPy arrays. Clipping bounds the global L2
norm of its floating-point arrays by the clipping norm C, which bounds the
L2 sensitivity of a sum of updates by C when one client is added or removed.

Integer-array policy: integer and bool arrays (for example the
`num_batches_tracked` counters of BatchNorm) are not clipped, not noised and
not protected by differential privacy. They pass through unchanged, and a
server that releases them releases them exactly. Keep secrets out of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt

MAX_SCALE_RETRIES = 64
"""Attempts to shrink a clipped update whose rounding pushed its norm above C."""

MIN_MAX_GRAD_NORM = 2.0**-60
"""Smallest per-example gradient clipping norm C of DP-SGD, about 8.7e-19.

Opacus trains in float32, whose normal numbers end at 2**-126. The clipped
gradients and the noise, of standard deviation z * C, scale with C. Below
the normal range their values keep fewer bits, and noise rounded to a
coarse grid no longer hides the low bits of the gradient sum. From 2**-60
on, the noise's standard deviation stays above 2**-70 for every noise
multiplier of at least 2**-10, far inside the normal range.
"""

MIN_SAFE_SQUARE = 2.0**-968
"""Smallest sum of squares that `l2_norm` uses directly.

Below it, the squares of the smallest values may have lost bits as float64
subnormals (below 2**-1022) or become 0, so the norm is computed from
rescaled values. At this sum each lost bit is at most 2**-106 of it.
"""


@dataclass(frozen=True)
class ClipResult:
    """Update after L2 clipping.

    Attributes:
        arrays: The update with the same dtypes and shapes as the input.
            Arrays that needed no change are the input objects, not copies.
        norm: Global L2 norm of the floating-point arrays before clipping,
            computed in float64.
        clipped: Whether the floating-point arrays were scaled down. An
            update with norm 0 or norm <= C is not clipped.

    """

    arrays: list[npt.NDArray[np.generic]]
    norm: float
    clipped: bool


def is_float_array(array: npt.NDArray[np.generic]) -> bool:
    """Return whether the array's dtype is a real floating-point type."""
    return bool(np.issubdtype(array.dtype, np.floating))


def validate_update(update: Sequence[npt.NDArray[np.generic]]) -> None:
    """Raise ValueError unless every array is a real number array with finite floats.

    Args:
        update: The arrays of one model update.

    Raises:
        ValueError: If an array has a complex, object or string dtype, or a
            floating-point array contains NaN or infinity. The message names
            the array's index.

    """
    for index, array in enumerate(update):
        dtype = np.asarray(array).dtype
        numeric = np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_)
        if not numeric or np.issubdtype(dtype, np.complexfloating):
            raise ValueError(
                f"update[{index}] must have a real float, integer or bool dtype. "
                f"Found {dtype}."
            )
        if np.issubdtype(dtype, np.floating) and not np.all(np.isfinite(array)):
            raise ValueError(
                f"update[{index}] must contain only finite values. "
                "Found NaN or infinity."
            )


def l2_norm(update: Sequence[npt.NDArray[np.generic]]) -> float:
    """Compute the global L2 norm of the floating-point arrays in float64.

    Integer and bool arrays do not count. Computing in float64 keeps a
    float16 update, whose squares overflow float16 above 256, finite. When
    the sum of squares overflows or underflows float64 (values above about
    1e154 or below about 1e-154), the arrays are divided by their largest
    magnitude first, so the norm is still correct.
    """
    flats = [
        np.asarray(array, dtype=np.float64).ravel()
        for array in update
        if is_float_array(array)
    ]
    squared_norm = math.fsum(float(np.dot(flat, flat)) for flat in flats)
    if MIN_SAFE_SQUARE <= squared_norm < math.inf:
        return math.sqrt(squared_norm)

    magnitudes = [float(np.max(np.abs(flat))) for flat in flats if flat.size]
    largest = max(magnitudes, default=0.0)
    if largest == 0.0 or not math.isfinite(largest):
        return largest
    scaled_squares = math.fsum(
        float(np.dot(flat / largest, flat / largest)) for flat in flats
    )
    return largest * math.sqrt(scaled_squares)


def clip_update_l2(
    update: Sequence[npt.NDArray[np.generic]], *, clipping_norm: float
) -> ClipResult:
    """Scale the floating-point arrays of an update so their global L2 norm is <= C.

    With norm = ||update||_2 over all floating-point arrays, every
    floating-point array is multiplied by min(1, C / norm). The product is
    computed in float64 and cast back to each array's dtype. If that rounding
    puts the norm above C, the factor is multiplied by 1 - eps, with eps the
    largest machine epsilon of the dtypes, until the norm computed in float64
    is at most C. So a returned update always satisfies norm <= C, the bound
    that the privacy analysis needs.

    Integer and bool arrays are returned unchanged: they are not clipped,
    not noised and not protected (see the module docstring).

    Args:
        update: The arrays of one model update.
        clipping_norm: The clipping norm C, finite and positive.

    Returns:
        The clipped arrays, the norm before clipping and whether clipping
        changed the update.

    Raises:
        ValueError: If `clipping_norm` is not finite and positive, or an
            array is invalid (see `validate_update`).
        RuntimeError: If `MAX_SCALE_RETRIES` attempts leave the norm above
            C, which no test input has caused.

    """
    _check_clipping_norm(clipping_norm)
    arrays = [np.asarray(array) for array in update]
    validate_update(arrays)

    norm = l2_norm(arrays)
    if not math.isfinite(norm):
        raise ValueError(
            "The update's floating-point values exceed the float64 range, so "
            f"its norm cannot be computed. Found norm {norm}."
        )
    if norm <= clipping_norm:
        return ClipResult(arrays=arrays, norm=norm, clipped=False)

    clipped = _scale_to_norm(arrays, clipping_norm=clipping_norm, norm=norm)

    return ClipResult(arrays=clipped, norm=norm, clipped=True)


def _scale_to_norm(
    arrays: list[npt.NDArray[np.generic]], *, clipping_norm: float, norm: float
) -> list[npt.NDArray[np.generic]]:
    factor = clipping_norm / norm
    shrink = max(
        (_machine_epsilon(array) for array in arrays if is_float_array(array)),
        default=0.0,
    )
    for _ in range(MAX_SCALE_RETRIES):
        scaled = [_scale_array(array, factor) for array in arrays]
        if l2_norm(scaled) <= clipping_norm:
            return scaled
        factor *= 1.0 - shrink

    raise RuntimeError(
        "Clipping could not bring the update's norm to clipping_norm "
        f"{clipping_norm} after {MAX_SCALE_RETRIES} attempts."
    )


def _scale_array(
    array: npt.NDArray[np.generic], factor: float
) -> npt.NDArray[np.generic]:
    if not is_float_array(array):
        return array
    scaled = np.asarray(array, dtype=np.float64) * factor
    # asarray keeps a 0-d input a 0-d array, not a NumPy scalar.
    return np.asarray(scaled.astype(array.dtype))


def _machine_epsilon(array: npt.NDArray[np.generic]) -> float:
    dtype = cast("np.dtype[np.floating[Any]]", array.dtype)
    return float(np.finfo(dtype).eps)


def _check_clipping_norm(clipping_norm: float) -> None:
    if not math.isfinite(clipping_norm) or clipping_norm <= 0:
        raise ValueError(
            f"clipping_norm must be finite and positive. Found {clipping_norm}."
        )
