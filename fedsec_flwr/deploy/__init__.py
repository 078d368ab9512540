"""Real deployment of Flower apps: credentials and a local TLS federation.

``python -m fedsec_flwr.deploy credentials`` creates the CA, the SuperLink's
TLS certificate and the SuperNode authentication keys. ``python -m
fedsec_flwr.deploy run-local`` runs an app on a SuperLink and SuperNodes on
this machine, over TLS with SuperNode authentication.
"""

from .credentials import CredentialPaths, CredentialsError, create_credentials
from .local import DeploymentError, LocalFederation, RunResult

__all__ = [
    "CredentialPaths",
    "CredentialsError",
    "DeploymentError",
    "LocalFederation",
    "RunResult",
    "create_credentials",
]
