"""Secure aggregation, differential privacy and verification for Flower.

The public API: ``SecureFedAvg`` (a server strategy), ``secure_aggregation_mod``
(the matching ClientApp mod), ``SecAggConfig``, ``DPConfig`` and
``VerificationConfig`` (their parameters), ``ServerMomentum`` (the
server's learning rate and momentum), and ``ClientPrivacyBudget`` (a
client's own limit on epsilon, for ``make_secure_aggregation_mod``). They are
imported on first use, so ``fedsec_flwr.core`` loads without Flower.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .budget import ClientPrivacyBudget, PrivacyBudgetError
    from .config import SecAggConfig
    from .core.errors import AuthenticationError, ProtocolError, TooFewSurvivorsError
    from .mod import (
        make_plain_verification_mod,
        make_secure_aggregation_mod,
        plain_verification_mod,
        secure_aggregation_mod,
    )
    from .privacy import DPConfig, DPMode
    from .server_momentum import ServerMomentum
    from .strategy import RoundReport, SecureFedAvg
    from .verification import FailurePolicy, VerificationConfig, VerificationError

_EXPORTS = {
    "AuthenticationError": ".core.errors",
    "ClientPrivacyBudget": ".budget",
    "DPConfig": ".privacy",
    "DPMode": ".privacy",
    "FailurePolicy": ".verification",
    "VerificationConfig": ".verification",
    "VerificationError": ".verification",
    "make_plain_verification_mod": ".mod",
    "make_secure_aggregation_mod": ".mod",
    "plain_verification_mod": ".mod",
    "PrivacyBudgetError": ".budget",
    "ProtocolError": ".core.errors",
    "RoundReport": ".strategy",
    "SecAggConfig": ".config",
    "SecureFedAvg": ".strategy",
    "ServerMomentum": ".server_momentum",
    "TooFewSurvivorsError": ".core.errors",
    "secure_aggregation_mod": ".mod",
}

__all__ = [
    "AuthenticationError",
    "ClientPrivacyBudget",
    "DPConfig",
    "DPMode",
    "FailurePolicy",
    "VerificationConfig",
    "VerificationError",
    "make_plain_verification_mod",
    "make_secure_aggregation_mod",
    "plain_verification_mod",
    "PrivacyBudgetError",
    "ProtocolError",
    "RoundReport",
    "SecAggConfig",
    "SecureFedAvg",
    "ServerMomentum",
    "TooFewSurvivorsError",
    "secure_aggregation_mod",
]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedsec_flwr' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
