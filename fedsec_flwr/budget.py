"""A client's own privacy budget, enforced whatever the server requests.

Under distributed DP the clients add the noise, but the server chooses how
much: it sends each client its discrete Gaussian sigma, the clipping norm and
the encoding. A server that sends a tiny sigma, central mode or no DP at all
would see an update with little or no noise, and the clients would not know.

`ClientPrivacyBudget` lets the operator of a client bound what the rounds
that client joins may release about it. Before it trains in a round, the
client composes the round's noise with that of every round it already
contributed to in the run and computes its epsilon with the RDP accountant of
``fedsec_flwr.dp.accounting``. It counts only the noise of
``min_honest_clients`` clients, itself included, because the other clients
in the sum may be controlled by the server, and it assumes no amplification
by sampling, because it cannot check how the server samples. A round that
would raise its epsilon above ``max_epsilon`` is rejected before training.

This module has no Flower imports; ``fedsec_flwr.mod`` stores the spent
rounds in ``Context.state``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._scalars import plain_fields
from .core.bounds import lower_bound_text
from .dp.accounting import (
    ACCOUNTANT_RDP,
    MIN_DISCRETE_SIGMA,
    DistributedDiscreteGaussianEvent,
    check_delta,
    compute_epsilon,
    quantized_l2_sensitivity,
)
from .dp.noise import MAX_DISCRETE_SIGMA
from .privacy import ClientPrivacy, DPMode

BIT_SENSITIVITY = 1.0
"""L2 sensitivity of the clipping bit of adaptive clipping, in integer units."""


class PrivacyBudgetError(ValueError):
    """A round would release more about this client than its budget allows."""


@dataclass(frozen=True)
class SpentRound:
    """The noise of one round this client contributed to, as it accounts it.

    Attributes:
        sigma_client: The client's discrete Gaussian sigma, in grid units.
        l2_sensitivity: Bound on the L2 norm of its quantized update.
        dimension: Number of noised coordinates of the update.
        bit_sigma_client: Sigma on its clipping bit, 0 without adaptive
            clipping.

    """

    sigma_client: float
    l2_sensitivity: float
    dimension: int
    bit_sigma_client: float = 0.0


@dataclass(frozen=True)
class ClientPrivacyBudget:
    """A client-side limit on the client-level epsilon of one run.

    Attributes:
        max_epsilon: Largest epsilon the client accepts over the run, at
            ``delta``.
        delta: Delta of that guarantee, in [1e-15, 0.1).
        min_honest_clients: Clients, this one included, whose noise the
            client counts on in each sum. 1 trusts no other client.

    Raises:
        ValueError: If a value is out of range.

    """

    max_epsilon: float
    delta: float = 1e-5
    min_honest_clients: int = 1

    def __post_init__(self) -> None:
        plain_fields(self, "max_epsilon", "delta", "min_honest_clients")
        if not _is_number(self.max_epsilon) or not (
            math.isfinite(self.max_epsilon) and self.max_epsilon > 0
        ):
            raise ValueError(
                f"max_epsilon must be a finite number above 0. "
                f"Found {self.max_epsilon!r}."
            )
        check_delta("delta", self.delta)
        if (
            isinstance(self.min_honest_clients, bool)
            or not isinstance(self.min_honest_clients, int)
            or self.min_honest_clients < 1
        ):
            raise ValueError(
                "min_honest_clients must be an integer of at least 1. "
                f"Found {self.min_honest_clients!r}."
            )

    def admit(
        self,
        privacy: ClientPrivacy | None,
        *,
        quantization_scale: float,
        dimension: int,
        spent: tuple[SpentRound, ...],
    ) -> SpentRound:
        """Check a requested round against the budget and return its cost.

        Args:
            privacy: The round's DP instructions from the server, or None.
            quantization_scale: Integers per model unit of the round's
                encoding.
            dimension: Number of floating-point values of the update.
            spent: The rounds this client already contributed to in the run.

        Returns:
            The round as the client accounts it; pass it to `epsilon` with
            ``spent`` once the client has sent its noised update.

        Raises:
            PrivacyBudgetError: If the round has no distributed noise, or if
                it would raise epsilon above ``max_epsilon``.

        """
        if privacy is None:
            raise PrivacyBudgetError(
                "This client has a privacy budget and accepts only rounds with "
                "distributed DP; the server requested a round without DP."
            )
        if privacy.mode is not DPMode.DISTRIBUTED:
            raise PrivacyBudgetError(
                "This client has a privacy budget and accepts only rounds with "
                f"distributed DP; the server requested dp-mode {privacy.mode.value!r}, "
                "in which the server adds the noise."
            )
        _check_sigma("dp-sigma-client", privacy.sigma_client)
        if privacy.adaptive:
            _check_sigma("dp-bit-sigma-client", privacy.bit_sigma_client)

        try:
            cost = SpentRound(
                sigma_client=privacy.sigma_client,
                l2_sensitivity=quantized_l2_sensitivity(
                    clipping_norm=privacy.clipping_norm,
                    quantization_scale=quantization_scale,
                    dimension=dimension,
                ),
                dimension=dimension,
                bit_sigma_client=privacy.bit_sigma_client if privacy.adaptive else 0.0,
            )
            projected = self.epsilon((*spent, cost))
        except (OverflowError, ValueError) as error:
            raise PrivacyBudgetError(
                "This client has a privacy budget and cannot account the round: "
                f"dp-clipping-norm {privacy.clipping_norm}, dp-sigma-client "
                f"{privacy.sigma_client} and quantization scale "
                f"{quantization_scale} give {type(error).__name__}: {error}"
            ) from None
        if projected > self.max_epsilon:
            raise PrivacyBudgetError(
                "This round would raise the client's epsilon to "
                f"{lower_bound_text(projected)} "
                f"after {len(spent) + 1} rounds, above its max_epsilon "
                f"{self.max_epsilon} at delta {self.delta}, counting the noise of "
                f"{self.min_honest_clients} honest clients."
            )
        return cost

    def epsilon(self, rounds: tuple[SpentRound, ...]) -> float:
        """Return the client's epsilon over ``rounds`` at ``delta``."""
        events = []
        for spent_round in rounds:
            events.append(
                DistributedDiscreteGaussianEvent(
                    sigma_client=spent_round.sigma_client,
                    num_survivors=self.min_honest_clients,
                    l2_sensitivity=spent_round.l2_sensitivity,
                    dimension=spent_round.dimension,
                )
            )
            if spent_round.bit_sigma_client > 0:
                events.append(
                    DistributedDiscreteGaussianEvent(
                        sigma_client=spent_round.bit_sigma_client,
                        num_survivors=self.min_honest_clients,
                        l2_sensitivity=BIT_SENSITIVITY,
                        dimension=1,
                    )
                )
        return compute_epsilon(events, delta=self.delta, accountant=ACCOUNTANT_RDP)


def _check_sigma(field: str, sigma: float) -> None:
    # Written so that NaN fails the check too.
    if not MIN_DISCRETE_SIGMA <= sigma <= MAX_DISCRETE_SIGMA:
        raise PrivacyBudgetError(
            f"This client has a privacy budget; the server requested {field} "
            f"{sigma}, outside the range [{MIN_DISCRETE_SIGMA}, "
            f"{MAX_DISCRETE_SIGMA:.0f}] that the client can sample and account."
        )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
