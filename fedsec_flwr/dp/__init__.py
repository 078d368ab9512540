"""Differential privacy: clipping, noise, accounting and adaptive clipping.

This layer uses NumPy, SciPy and Opacus and imports no Flower code.
`fedsec_flwr.dp.accounting` imports Opacus (and so torch) only when an
epsilon is computed.
"""

from .accounting import (
    DistributedDiscreteGaussianEvent,
    GaussianEvent,
    PrivacyAccountant,
    TargetEpsilonUnreachableError,
    client_sample_rate,
    compute_epsilon,
    distributed_discrete_gaussian_epsilon,
    distributed_discrete_gaussian_rdp,
    noise_multiplier_for_target,
    quantized_l2_sensitivity,
    rdp_epsilon_floor,
    rounds_within_budget,
)
from .adaptive import AdaptiveClipping, client_bit, effective_noise_multiplier
from .clipping import ClipResult, clip_update_l2, l2_norm, validate_update
from .noise import (
    add_gaussian_noise,
    central_noise_std,
    discrete_gaussian_variance,
    distributed_noise_headroom,
    distributed_noise_scale,
    effective_distributed_sigma,
    sample_discrete_gaussian,
)
from .random import SecureRandom

__all__ = [
    "AdaptiveClipping",
    "ClipResult",
    "DistributedDiscreteGaussianEvent",
    "GaussianEvent",
    "PrivacyAccountant",
    "SecureRandom",
    "TargetEpsilonUnreachableError",
    "add_gaussian_noise",
    "central_noise_std",
    "client_bit",
    "client_sample_rate",
    "clip_update_l2",
    "compute_epsilon",
    "discrete_gaussian_variance",
    "distributed_discrete_gaussian_epsilon",
    "distributed_discrete_gaussian_rdp",
    "distributed_noise_headroom",
    "distributed_noise_scale",
    "effective_distributed_sigma",
    "effective_noise_multiplier",
    "l2_norm",
    "noise_multiplier_for_target",
    "quantized_l2_sensitivity",
    "rdp_epsilon_floor",
    "rounds_within_budget",
    "sample_discrete_gaussian",
    "validate_update",
]
