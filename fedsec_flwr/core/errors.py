"""Exceptions raised by the protocol layer."""


class ProtocolError(Exception):
    """A protocol message or state is invalid; the round cannot go on with it."""


class AuthenticationError(ProtocolError):
    """An authenticated ciphertext or signature failed verification.

    The message never says why, so that it tells an attacker nothing.
    """


class TooFewSurvivorsError(ProtocolError):
    """Too few clients are left to finish a round without revealing an update."""
