"""Fixed-point encoding of model updates for summation modulo a power of two.

A client's update (new minus global weights) is clipped to ``[-clip_range,
clip_range]`` per coordinate, shifted to ``[0, 2 * clip_range]`` and scaled to
the integer grid ``{0, ..., quantization_levels - 1}`` with unbiased
stochastic rounding. The client multiplies its grid values by its integer
weight (its number of training examples), so the server's modular sum is the
exact weighted sum of grid values as long as that sum stays below the modulus.
``validate_capacity`` checks that bound for the worst case.

The encoded vector carries two trailer slots after the model coordinates: the
client's weight, so the server learns only the total weight, and the number of
coordinates the client had to clip, saturated so the sum cannot wrap. Callers
may append extra integer slots (an adaptive-clipping bit, commitment blinding
limbs) that are summed with the rest.

Distributed differential privacy adds centred integer noise to the encoded
coordinates. ``noise_headroom`` reserves room for it on both sides of the
signal, and ``decode_sum`` reads sums in the top ``noise_headroom`` values of
the modulus as negative.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from .bounds import lower_bound_text

TRAILER_SIZE = 2
"""Slots after the model coordinates: the weight and the clipped-coordinate count."""

MIN_ADVISED_CLIENTS = 2
"""Smallest max_clients that the capacity advice proposes. A secure sum
needs two clients, and `fedsec_flwr.SecAggConfig` rejects fewer."""

MAX_MODULUS = 2**32
"""Largest modulus: masked values travel as uint32."""

MIN_CLIP_RANGE = 2.0**-991
"""Smallest clip range, about 4.8e-299.

`decode_sum` multiplies the sum by 2 * clip_range / (total_weight *
(quantization_levels - 1)), and the capacity check keeps that denominator
below 2**32. From 2**-991 on, the factor is a normal float64 for every
modulus up to `MAX_MODULUS`. Below, total_weight * scale can overflow: with
24 bits and 64 clients, clip_range 1e-300 decoded about 9e6 steps off.
"""


@dataclass(frozen=True)
class EncodingParams:
    """Parameters of the fixed-point encoding shared by the server and clients.

    Attributes:
        clip_range: Largest absolute value of an update coordinate; larger values
            are clipped to it.
        quantization_levels: Number of integer grid points over the clip range.
        modulus: Power of two modulo which encoded vectors are summed.
        max_weight: Largest integer weight one client may contribute.
        max_clients: Largest number of clients whose vectors are summed.
        noise_headroom: Bound on the absolute value of the summed noise of one
            coordinate; 0 without distributed noise.

    """

    clip_range: float
    quantization_levels: int
    modulus: int
    max_weight: int
    max_clients: int
    noise_headroom: int = 0

    def __post_init__(self) -> None:
        validate_capacity(
            clip_range=self.clip_range,
            quantization_levels=self.quantization_levels,
            modulus=self.modulus,
            max_weight=self.max_weight,
            max_clients=self.max_clients,
            noise_headroom=self.noise_headroom,
        )

    @property
    def scale(self) -> float:
        """Grid steps per unit of update value."""
        return (self.quantization_levels - 1) / (2.0 * self.clip_range)

    @property
    def step(self) -> float:
        """Width of one grid step in update units: the rounding error bound."""
        return 1.0 / self.scale

    @property
    def clip_count_cap(self) -> int:
        """Largest clipped-coordinate count one client reports."""
        return (self.modulus - 1) // self.max_clients


def validate_capacity(
    *,
    clip_range: float,
    quantization_levels: int,
    modulus: int,
    max_weight: int,
    max_clients: int,
    noise_headroom: int = 0,
) -> None:
    """Check the encoding parameters and that no worst-case sum wraps the modulus.

    Raises:
        ValueError: A parameter is out of range, or ``max_clients * max_weight *
            (quantization_levels - 1) + 2 * noise_headroom`` is not below
            ``modulus``.

    """
    if not math.isfinite(clip_range) or clip_range <= 0:
        raise ValueError(
            f"clip_range must be a finite number above 0. Found {clip_range!r}."
        )
    if clip_range < MIN_CLIP_RANGE:
        raise ValueError(
            f"clip_range must be at least {lower_bound_text(MIN_CLIP_RANGE)} "
            "(2**-991), or the "
            f"decoded sum loses its precision. Found {clip_range!r}."
        )
    if modulus < 2 or modulus > MAX_MODULUS or modulus & (modulus - 1):
        raise ValueError(
            f"modulus must be a power of two between 2 and 2**32. Found {modulus!r}."
        )
    if quantization_levels < 2 or quantization_levels >= modulus:
        raise ValueError(
            "quantization_levels must be at least 2 and below the modulus "
            f"{modulus}. Found {quantization_levels!r}."
        )
    scale = (quantization_levels - 1) / (2.0 * clip_range)
    if not (math.isfinite(scale) and scale > 0 and math.isfinite(1.0 / scale)):
        raise ValueError(
            "clip_range must leave a finite, nonzero grid step "
            f"2 * clip_range / (quantization_levels - 1). Found clip_range "
            f"{clip_range!r} with {quantization_levels} levels."
        )
    if max_weight < 1:
        raise ValueError(f"max_weight must be at least 1. Found {max_weight!r}.")
    if max_clients < 1:
        raise ValueError(f"max_clients must be at least 1. Found {max_clients!r}.")

    if noise_headroom < 0:
        raise ValueError(
            f"noise_headroom must be non-negative. Found {noise_headroom!r}."
        )

    worst_case = max_clients * max_weight * (quantization_levels - 1)
    if worst_case + 2 * noise_headroom >= modulus:
        advice = _capacity_advice(
            modulus=modulus,
            max_clients=max_clients,
            max_weight=max_weight,
            quantization_levels=quantization_levels,
            noise_headroom=noise_headroom,
        )
        raise ValueError(
            "The worst-case sum max_clients * max_weight * (quantization_levels - 1)"
            f" = {max_clients} * {max_weight} * {quantization_levels - 1} = "
            f"{worst_case}, plus twice the noise headroom {noise_headroom}, would "
            f"wrap the modulus {modulus}. {advice}"
        )


def _capacity_advice(
    *,
    modulus: int,
    max_clients: int,
    max_weight: int,
    quantization_levels: int,
    noise_headroom: int,
) -> str:
    """Name the settings whose change alone makes the worst-case sum fit.

    A setting is named when taking it to its limit (`MIN_ADVISED_CLIENTS`
    clients, weight 1, two levels or no noise) makes the sum fit on its
    own. When none does, every setting that can still be lowered is named,
    since only a combination helps. Raising the modulus is named when the
    sum fits the largest modulus.
    """
    signal = max_clients * max_weight * (quantization_levels - 1)
    fewest = MIN_ADVISED_CLIENTS
    # Each setting with the sum it leaves when taken to its limit.
    candidates = [
        (
            "max_clients",
            max_clients > fewest,
            signal // max_clients * fewest + 2 * noise_headroom,
        ),
        ("max_weight", max_weight > 1, signal // max_weight + 2 * noise_headroom),
        (
            "the quantization bits",
            quantization_levels > 2,
            signal // (quantization_levels - 1) + 2 * noise_headroom,
        ),
        ("the noise", noise_headroom > 0, signal),
    ]
    movable = [(name, best) for name, can_move, best in candidates if can_move]
    lower = [name for name, best in movable if best < modulus]
    if not lower:
        lower = [name for name, _ in movable]
    raise_modulus = modulus < MAX_MODULUS and signal + 2 * noise_headroom < MAX_MODULUS

    parts = []
    if lower:
        parts.append("Lower " + _join_or(lower))
    if raise_modulus:
        parts.append(f"raise the modulus (at most 2**{MAX_MODULUS.bit_length() - 1})")
    return ", or ".join(parts) + "."


def _join_or(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + f" or {names[-1]}"


def max_quantization_bits(*, modulus: int, max_weight: int, max_clients: int) -> int:
    """Return the most quantization bits whose worst-case sum fits the modulus.

    Returns 0 when not even two levels fit.
    """
    capacity = (modulus - 1) // (max_weight * max_clients)
    # Levels L fit when L - 1 <= capacity, so the bits are floor(log2(capacity + 1)).
    return (capacity + 1).bit_length() - 1


def encode_update(
    update: NDArray[np.float64],
    *,
    weight: int,
    params: EncodingParams,
    rng: np.random.Generator,
    overwrite: bool = False,
    extra: Sequence[int] = (),
    report_clipped: bool = True,
) -> tuple[NDArray[np.uint32], int]:
    """Clip, quantize and weight a flat update, and append the trailer slots.

    Args:
        update: Flat float64 update; it must be finite.
        weight: The client's integer weight, 0 to ``params.max_weight``.
        params: The shared encoding parameters.
        rng: Source of the stochastic-rounding draws.
        overwrite: Use ``update`` as scratch space instead of a copy, which
            saves one allocation of the update's size; its values are lost.
        extra: Values of the extra slots, each in ``[0, 2**32)``; the caller
            keeps their sums below the modulus.
        report_clipped: Write the number of clipped coordinates into its
            trailer slot. Under DP that count is data the noise does not
            cover, so the slot is left at 0.

    Returns:
        The encoded vector of ``update.size + TRAILER_SIZE + len(extra)``
        uint32 values and the number of coordinates that were clipped.

    Raises:
        ValueError: The weight is out of range or the update is not finite.

    """
    if not 0 <= weight <= params.max_weight:
        raise ValueError(
            f"weight must be between 0 and max_weight {params.max_weight}. "
            f"Found {weight!r}."
        )
    if not np.isfinite(update).all():
        raise ValueError("update must be finite. Found NaN or inf.")

    top = params.quantization_levels - 1
    grid = update if overwrite else update.copy()
    grid += params.clip_range
    np.multiply(grid, params.scale, out=grid)
    num_clipped = int(np.count_nonzero(grid < 0.0)) + int(np.count_nonzero(grid > top))
    np.clip(grid, 0.0, top, out=grid)

    # Stochastic rounding: floor(z + u) with u uniform in [0, 1) is ceil(z) with
    # probability frac(z) and floor(z) otherwise, so it is unbiased.
    grid += rng.random(grid.shape, dtype=np.float32)
    np.floor(grid, out=grid)
    np.minimum(grid, top, out=grid)

    encoded = np.empty(update.size + TRAILER_SIZE + len(extra), dtype=np.uint32)
    levels = encoded[: update.size]
    levels[:] = grid
    levels *= np.uint32(weight)
    encoded[update.size] = weight
    encoded[update.size + 1] = (
        min(num_clipped, params.clip_count_cap) if report_clipped else 0
    )
    encoded[update.size + TRAILER_SIZE :] = np.asarray(extra, dtype=np.uint64)
    return encoded, num_clipped


@dataclass(frozen=True)
class DecodedSum:
    """The decoded sum of the clients' encoded vectors.

    Attributes:
        mean: The weighted mean update, float64.
        total_weight: Sum of the clients' weights.
        num_clipped: Sum of the clients' clipped-coordinate counts.
        extra: Sums of the extra slots, modulo the modulus.

    """

    mean: NDArray[np.float64]
    total_weight: int
    num_clipped: int
    extra: NDArray[np.uint32]


def decode_sum(
    total: NDArray[np.uint32], *, params: EncodingParams, num_extra: int = 0
) -> DecodedSum:
    """Turn the sum of encoded vectors into the weighted mean update.

    Args:
        total: Sum of the clients' encoded vectors modulo ``params.modulus``.
        params: The shared encoding parameters.
        num_extra: Number of extra slots at the end of the vector.

    Raises:
        ValueError: The vector is too short or the total weight is zero.

    """
    if num_extra < 0 or total.size < TRAILER_SIZE + num_extra:
        raise ValueError(
            f"total must hold at least {TRAILER_SIZE + num_extra} values. "
            f"Found {total.size}."
        )
    size = total.size - TRAILER_SIZE - num_extra
    total_weight = int(total[size])
    num_clipped = int(total[size + 1])
    if total_weight == 0:
        raise ValueError(
            "The total weight of the aggregated clients is 0, so their weighted "
            "mean is undefined."
        )

    coordinates = total[:size]
    if params.noise_headroom:
        signed = coordinates.astype(np.int64)
        signed[signed >= params.modulus - params.noise_headroom] -= params.modulus
        coordinates = signed  # type: ignore[assignment]

    # mean = sum / total_weight / scale - clip_range, in one scaling pass.
    mean = np.multiply(coordinates, 1.0 / (total_weight * params.scale))
    mean -= params.clip_range
    return DecodedSum(
        mean=mean,
        total_weight=total_weight,
        num_clipped=num_clipped,
        extra=total[size + TRAILER_SIZE :].copy(),
    )
