"""Server learning rate and momentum on each round's mean update (FedAvgM).

Plain FedAvg adds the mean update to the global model. With
`ServerMomentum` the server keeps a velocity v and, in round r, computes

    v_r = momentum * v_{r-1} + mean_r,    with v_0 = 0,
    G_{r+1} = G_r + learning_rate * v_r,

so ``ServerMomentum(learning_rate=1.0, momentum=0.0)`` is FedAvg. Under DP
the mean is the one the server releases, with its noise, so the velocity
is post-processing and costs no privacy budget. The module imports no
Flower code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ._scalars import plain_fields

DEFAULT_SERVER_MOMENTUM = 0.9
"""Momentum of `ServerMomentum` by default, as in FedAvgM (Hsu et al. 2019)."""


@dataclass(frozen=True, kw_only=True)
class ServerMomentum:
    """Server-side SGD with momentum on the mean update, checked when constructed.

    Attributes:
        learning_rate: Step size on the velocity, a finite number above 0.
        momentum: Share of the previous velocity kept each round, in [0, 1).
    """

    learning_rate: float = 1.0
    momentum: float = DEFAULT_SERVER_MOMENTUM

    def __post_init__(self) -> None:
        plain_fields(self, "learning_rate", "momentum")
        learning_rate = self.learning_rate
        if not _is_real(learning_rate) or not (
            math.isfinite(learning_rate) and learning_rate > 0.0
        ):
            raise ValueError(
                "learning_rate must be a finite number above 0. "
                f"Found {learning_rate!r}."
            )
        momentum = self.momentum
        if not _is_real(momentum) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1). Found {momentum!r}.")


class MomentumState:
    """The velocity of one run, which turns each mean update into a model step."""

    def __init__(self, config: ServerMomentum) -> None:
        self.config = config
        self._velocity: NDArray[np.float64] | None = None

    def step(self, mean_update: NDArray[np.float64]) -> NDArray[np.float64]:
        """Fold `mean_update` into the velocity and return the step to add.

        Raises:
            ValueError: If `mean_update` is not a one-dimensional float64
                array of the length of the earlier ones.
        """
        if mean_update.dtype != np.float64 or mean_update.ndim != 1:
            raise ValueError(
                "mean_update must be a one-dimensional float64 array. Found "
                f"dtype {mean_update.dtype} and shape {mean_update.shape}."
            )
        previous = self._velocity
        if previous is None:
            velocity = mean_update.copy()
        elif previous.shape != mean_update.shape:
            raise ValueError(
                f"mean_update must have {previous.size} values, as in the earlier "
                f"rounds of the run. Found {mean_update.size}."
            )
        else:
            velocity = self.config.momentum * previous + mean_update

        self._velocity = velocity
        return self.config.learning_rate * velocity


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
