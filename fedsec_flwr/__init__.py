"""Secure aggregation, differential privacy and verification for Flower.

The public API: ``SecureFedAvg`` (a server strategy), ``secure_aggregation_mod``
(the matching ClientApp mod) and ``SecAggConfig`` (their parameters).
"""

from .config import SecAggConfig
from .core.errors import AuthenticationError, ProtocolError, TooFewSurvivorsError
from .mod import secure_aggregation_mod
from .strategy import RoundReport, SecureFedAvg

__all__ = [
    "AuthenticationError",
    "ProtocolError",
    "RoundReport",
    "SecAggConfig",
    "SecureFedAvg",
    "TooFewSurvivorsError",
    "secure_aggregation_mod",
]
