"""Validated configuration of secure aggregation."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from ._scalars import plain_fields
from .core.client import MAX_NEIGHBOURS
from .core.encoding import (
    MAX_MODULUS,
    EncodingParams,
    max_quantization_bits,
    validate_capacity,
)

MAX_AUTO_QUANTIZATION_BITS = 24
"""Cap on automatic quantization bits: float32 updates carry 24 significant bits."""

MIN_AUTO_QUANTIZATION_BITS = 8
"""Minimum automatic quantization bits without a warning: 256 levels over the
clip range. A large max_weight or max_clients leaves fewer."""

MIN_THRESHOLD = 2

logger = logging.getLogger("fedsec_flwr.config")

KEY_LIFETIME_ROUND = "round"
"""New keys every round: four exchanges per round (SecAgg+ as published)."""

KEY_LIFETIME_RUN = "run"
"""Keys agreed once per run: two exchanges per round after the first."""

KEY_LIFETIMES = (KEY_LIFETIME_ROUND, KEY_LIFETIME_RUN)


@dataclass(frozen=True, kw_only=True)
class SecAggConfig:
    """Parameters of SecAgg+ secure aggregation, checked when constructed.

    Attributes:
        clip_range: Largest absolute value of an update coordinate (new minus
            global weights). Larger coordinates are clipped and counted.
        modulus: Power of two, at most 2**32, modulo which inputs are summed.
        quantization_bits: Bits of the fixed-point grid over
            ``[-clip_range, clip_range]``. ``None`` picks the most bits (at
            most 24) whose worst-case weighted sum still fits the modulus.
        max_weight: Largest weight (number of training examples) one client
            may report; a client with more is rejected in that round.
        max_clients: Largest number of clients in one round.
        num_neighbours: Degree of the neighbour graph, at least 2. ``None``
            picks ``ceil(log2 n) + 1``; ``n - 1`` or more gives classic
            SecAgg. A round whose surviving clients the graph no longer
            connects is aborted before unmasking.
        threshold: Shamir threshold over a client's share holders (its
            neighbours and itself); at least 2. ``None`` picks a strict
            majority of the holders.
        stage_timeout: Seconds the server waits for the replies of one stage;
            the masked-input stage includes local training.
        key_lifetime: ``"round"`` creates and shares new keys in every round
            (setup, share-keys, masked-input and unmask). ``"run"`` registers
            each client's keys once per run, derives the round's pairwise
            seeds from them, sends the self-mask seed's shares with the
            masked input, and so needs two exchanges per round. It tolerates
            fewer dropouts: each client accepts at most ``threshold - 2``
            dropped neighbours, and a round in which a client drops before
            sending its input and a neighbour of it drops after sending its
            own is aborted.

    """

    clip_range: float = 1.0
    modulus: int = MAX_MODULUS
    quantization_bits: int | None = None
    max_weight: int = 10_000
    max_clients: int = 100
    num_neighbours: int | None = None
    threshold: int | None = None
    stage_timeout: float = 600.0
    key_lifetime: str = KEY_LIFETIME_ROUND

    def __post_init__(self) -> None:
        plain_fields(
            self,
            "clip_range",
            "modulus",
            "quantization_bits",
            "max_weight",
            "max_clients",
            "num_neighbours",
            "threshold",
            "stage_timeout",
        )
        _check_int("max_weight", self.max_weight, minimum=1)
        _check_int("max_clients", self.max_clients, minimum=2)
        _check_int("modulus", self.modulus, minimum=2)
        if self.quantization_bits is not None:
            _check_int("quantization_bits", self.quantization_bits, minimum=1)
        if self.num_neighbours is not None:
            # A degree of 1 pairs the clients up, and each pair's sum is released.
            _check_int("num_neighbours", self.num_neighbours, minimum=2)
            if self.num_neighbours > MAX_NEIGHBOURS:
                raise ValueError(
                    f"num_neighbours must be at most {MAX_NEIGHBOURS}, the most "
                    f"neighbours a client accepts. Found {self.num_neighbours}."
                )
        if self.threshold is not None:
            _check_int("threshold", self.threshold, minimum=MIN_THRESHOLD)
        if self.threshold is not None and self.threshold > self.max_clients:
            raise ValueError(
                f"threshold must not exceed max_clients {self.max_clients}, the "
                f"most share holders a client can have. Found {self.threshold}."
            )
        if (
            self.num_neighbours is not None
            and self.threshold is not None
            and self.threshold > self.num_neighbours + 1
        ):
            raise ValueError(
                "threshold must not exceed the share holders per client "
                f"(num_neighbours + 1 = {self.num_neighbours + 1}). "
                f"Found {self.threshold}."
            )
        _check_real("clip_range", self.clip_range)
        if (
            isinstance(self.stage_timeout, bool)
            or not isinstance(self.stage_timeout, int | float)
        ) or not (math.isfinite(self.stage_timeout) and self.stage_timeout > 0):
            raise ValueError(
                "stage_timeout must be a finite number of seconds above 0. "
                f"Found {self.stage_timeout!r}."
            )
        if self.key_lifetime not in KEY_LIFETIMES:
            raise ValueError(
                f"key_lifetime must be {KEY_LIFETIME_ROUND!r} or "
                f"{KEY_LIFETIME_RUN!r}. Found {self.key_lifetime!r}."
            )
        # Building the encoding checks that one quantization level fits.
        self.encoding()

    def warn_if_imprecise(self) -> None:
        """Log a warning if the automatic quantization keeps few levels.

        The strategy calls this for the weighted encoding only: under DP
        the updates are encoded from the clipping norm, and max_weight plays
        no part.
        """
        levels = self.encoding().quantization_levels
        if self.quantization_bits is None and levels < 2**MIN_AUTO_QUANTIZATION_BITS:
            logger.warning(
                "SecAggConfig leaves %d quantization levels per coordinate for "
                "max_weight %d and max_clients %d in a modulus of %d, so updates "
                "lose most of their precision; lower max_weight or max_clients",
                levels,
                self.max_weight,
                self.max_clients,
                self.modulus,
            )

    def encoding(self) -> EncodingParams:
        """Return the fixed-point encoding these parameters define."""
        bits = self.quantization_bits
        if bits is None:
            bits = min(
                MAX_AUTO_QUANTIZATION_BITS,
                max_quantization_bits(
                    modulus=self.modulus,
                    max_weight=self.max_weight,
                    max_clients=self.max_clients,
                ),
            )
        if bits < 1 or bits >= 32:
            validate_capacity(
                clip_range=self.clip_range,
                quantization_levels=2,
                modulus=self.modulus,
                max_weight=self.max_weight,
                max_clients=self.max_clients,
            )
            raise ValueError(
                f"quantization_bits must be between 1 and 31. Found {bits}."
            )
        return EncodingParams(
            clip_range=self.clip_range,
            quantization_levels=2**bits,
            modulus=self.modulus,
            max_weight=self.max_weight,
            max_clients=self.max_clients,
        )


def _check_real(name: str, value: object) -> None:
    # Range checks come later, in the encoding. This one keeps bools and
    # strings out, which would otherwise pass as 1.0 or fail with a TypeError.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number. Found {value!r}.")


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(
            f"{name} must be an integer of at least {minimum}. Found {value!r}."
        )
