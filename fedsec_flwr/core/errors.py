"""Exceptions raised by the protocol layer."""


class ProtocolError(Exception):
    """A protocol message or state is invalid; the round cannot go on with it."""


class AuthenticationError(ProtocolError):
    """An authenticated ciphertext or signature failed verification.

    The message never says why, so that it tells an attacker nothing.
    """


class TooFewSurvivorsError(ProtocolError):
    """Too few clients are left to finish a round without revealing an update."""


def shortened(text: str, limit: int) -> str:
    """Return ``text`` cut to ``limit`` characters, saying how long it was.

    Error texts can quote values from a request of any size; a reply or a
    log line quotes at most ``limit`` characters of them.
    """
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters in all)"
