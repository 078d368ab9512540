"""Commitment-based verification of each round's aggregate, as protocol steps.

This module connects the primitives of `fedsec_flwr.core.transcript` to the
round structure of `SecureFedAvg` and the client mods, without Flower:

- `VerificationConfig` and `FailurePolicy` configure the server.
- `ServerVerification` collects identity keys, key-list signatures and
  commitments over one round, builds the `RoundTranscript`, audits it and
  combines the clients' verdicts.
- `ClientVerificationState` and the ``client_*`` functions are one client's
  side. The state contains the identity key of the run, so it must persist
  across rounds. It never contains the update or the blinding vector, which the
  mod keeps beside it as arrays.
- `CommitmentLayout`, in `fedsec_flwr.models`, maps an encoded vector to
  the vector a client commits to.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import audit
from .config import SecAggConfig
from .core import commitments, signatures
from .core import transcript as transcripts
from .core.commitments import BLINDING_LIMB_BITS, VerificationResult
from .core.encoding import MAX_MODULUS, MIN_ADVISED_CLIENTS
from .core.errors import AuthenticationError, ProtocolError
from .core.messages import (
    CommitReply,
    CommitRequest,
    Fields,
    IdentityKeyList,
    KeyListSignature,
    VerifyReply,
    VerifyRequest,
    _field,
    pack_node_ids,
    unpack_single_id,
)
from .core.signatures import SignedStage
from .core.transcript import RoundTranscript
from .models import RoundSettings

logger = logging.getLogger("fedsec_flwr.verification")

MAX_REASON_LENGTH = 300
"""Maximum length of a client-supplied failure reason in reports and logs."""


class FailurePolicy(StrEnum):
    """Action a party takes when a round's aggregate fails verification.

    ``refuse``: the server raises `VerificationError` and releases no model
    from the round, and a client does not train on any later model of the
    run. ``report``: both go on and report the failure.
    """

    REFUSE = "refuse"
    REPORT = "report"


class VerificationError(ProtocolError):
    """A round's aggregate failed verification, so no model from it is released."""


@dataclass(frozen=True, kw_only=True)
class VerificationConfig:
    """Server-side settings of aggregate verification, checked when constructed.

    Attributes:
        audit_path: JSON file to which the server appends each round's
            transcript and aggregate, for ``python -m fedsec_flwr.audit``.
            ``None`` writes no file. A file already there must be an
            audit file, and the rounds are added to it.
        on_failure: ``refuse`` raises `VerificationError` when a round fails
            verification; ``report`` releases the model and reports the round
            as not verified.
        plain_encoding: The fixed-point encoding of updates in plain mode
            (``secure_aggregation=None``), where clients send their encoded
            update in clear. Secure mode uses its own `SecAggConfig`.
        pipelined: Send the commit and verify requests of round r with the
            setup and share-keys requests of round r + 1, which removes two
            exchanges from every round but the last. Clients still check
            round r before they train on its model, and the server still
            raises before it sends that model. Round r's report waits for
            its result. Needs secure aggregation with keys per round.

    """

    audit_path: Path | None = None
    on_failure: FailurePolicy = FailurePolicy.REFUSE
    plain_encoding: SecAggConfig = field(default_factory=SecAggConfig)
    pipelined: bool = False

    def __post_init__(self) -> None:
        try:
            policy = FailurePolicy(str(self.on_failure))
        except ValueError:
            raise ValueError(
                f"on_failure must be 'refuse' or 'report'. Found {self.on_failure!r}."
            ) from None
        object.__setattr__(self, "on_failure", policy)
        if not isinstance(self.plain_encoding, SecAggConfig):
            raise ValueError(
                "plain_encoding must be a SecAggConfig. "
                f"Found {type(self.plain_encoding).__name__}."
            )
        if not isinstance(self.pipelined, bool):
            raise ValueError(
                f"pipelined must be a bool. Found {type(self.pipelined).__name__}."
            )
        if self.audit_path is not None:
            if not isinstance(self.audit_path, str | os.PathLike):
                raise ValueError(
                    "audit_path must be a path. "
                    f"Found {type(self.audit_path).__name__}."
                )
            path = Path(self.audit_path)
            if str(self.audit_path) == "" or path.is_dir():
                raise ValueError(
                    "audit_path must name a file, not a folder. "
                    f"Found {str(self.audit_path)!r}."
                )
            if not path.parent.is_dir():
                raise ValueError(
                    "audit_path must be in an existing folder. "
                    f"Found {str(path)!r}, whose folder does not exist."
                )
            # Checked now, so that a stale file fails the run before round 1.
            audit.check_appendable(path)
            object.__setattr__(self, "audit_path", path)
        check_blinding_capacity(
            modulus=self.plain_encoding.modulus,
            max_clients=self.plain_encoding.max_clients,
        )


def check_blinding_capacity(*, modulus: int, max_clients: int) -> None:
    """Check that the limb sums of `max_clients` clients cannot wrap `modulus`.

    Each blinding value is below 2**16, and the server needs the exact limb
    sums, so max_clients * (2**16 - 1) must be below the modulus.

    Raises:
        ValueError: If the limb sums could wrap.

    """
    limb_max = 2**BLINDING_LIMB_BITS - 1
    worst_case = max_clients * limb_max
    if worst_case >= modulus:
        raise ValueError(
            "max_clients * (2**16 - 1) must be below the modulus for verification, "
            f"so the blinding sums do not wrap. Found {max_clients} * 65535 = "
            f"{worst_case} with modulus {modulus}. "
            f"{_blinding_advice(modulus=modulus, max_clients=max_clients)}"
        )


def _blinding_advice(*, modulus: int, max_clients: int) -> str:
    """Name the changes that make the blinding sums of `max_clients` fit."""
    limb_max = 2**BLINDING_LIMB_BITS - 1
    fitting_clients = (modulus - 1) // limb_max
    can_lower = fitting_clients >= MIN_ADVISED_CLIENTS
    can_raise = modulus < MAX_MODULUS and max_clients * limb_max < MAX_MODULUS
    lower = f"Lower max_clients to at most {fitting_clients}"
    raise_modulus = "raise the modulus (at most 2**32)"

    if can_lower and can_raise:
        return f"{lower}, or {raise_modulus}."
    if can_lower:
        return f"{lower}."
    if can_raise:
        return f"{raise_modulus[0].upper()}{raise_modulus[1:]}."
    # Neither alone helps: max_clients above 65,537 with a small modulus.
    return (
        f"Raise the modulus to 2**32 and lower max_clients to at most "
        f"{(MAX_MODULUS - 1) // limb_max}."
    )


# --- Server side -----------------------------------------------------------------


@dataclass
class ServerVerification:
    """The server's verification state through one round.

    Call, in order: `receive_identity_keys` with the setup replies,
    `key_list_request` for each client, `receive_key_list_signatures`,
    `commit_request` once the aggregate is fixed, `receive_commitments`,
    `transcript`, `verify_request` for each committed client and `finish`.
    """

    run_id: int
    server_round: int
    model_sha256: bytes
    """The `model_digest` of the global model the server sent this round."""
    settings_sha256: bytes
    """The `RoundSettings.digest` of the settings the server sent this round."""
    identity_keys: dict[int, bytes] = field(default_factory=dict)
    key_list_signatures: dict[int, bytes] = field(default_factory=dict)
    commitments: dict[int, bytes] = field(default_factory=dict)
    commitment_signatures: dict[int, bytes] = field(default_factory=dict)
    included_node_ids: tuple[int, ...] = ()
    aggregate: npt.NDArray[np.uint32] | None = None
    blinding_sums: npt.NDArray[np.uint32] | None = None
    aggregate_sha256: bytes = b""
    _transcript_json: tuple[RoundTranscript, str] | None = None

    def receive_identity_keys(self, keys: Mapping[int, bytes]) -> set[int]:
        """Keep every well-formed identity key and return the nodes that sent one."""
        self.identity_keys = {
            node: key
            for node, key in sorted(keys.items())
            if len(key) == signatures.IDENTITY_KEY_SIZE
        }
        return set(self.identity_keys)

    def key_list_request(self, node_id: int) -> IdentityKeyList:
        """Return the identity-key list that client `node_id` signs."""
        return IdentityKeyList(identity_keys=dict(self.identity_keys))

    def receive_key_list_signatures(
        self, replies: Mapping[int, KeyListSignature]
    ) -> set[int]:
        """Keep the valid key-list signatures and return the nodes that sent one.

        A client whose signature does not verify against the list the server
        sent counts as dropped, because its commitment could never verify.
        """
        digest = signatures.key_list_digest(self.identity_keys)
        for node, reply in replies.items():
            if node not in self.identity_keys:
                continue
            try:
                signatures.verify(
                    self.identity_keys[node],
                    reply.signature,
                    run_id=self.run_id,
                    server_round=self.server_round,
                    stage=SignedStage.KEY_LIST,
                    payload=digest,
                )
            except AuthenticationError:
                logger.warning(
                    "Round %d: node %d sent an invalid key-list signature, so it "
                    "counts as dropped",
                    self.server_round,
                    node,
                )
                continue
            self.key_list_signatures[node] = reply.signature

        return set(self.key_list_signatures)

    def commit_request(
        self,
        included_node_ids: Sequence[int],
        aggregate: npt.NDArray[np.uint32],
        blinding_sums: npt.NDArray[np.uint32],
    ) -> CommitRequest:
        """Fix the round's aggregate and return the request every included client gets.

        `aggregate` is the vector the commitments must sum to, after
        `CommitmentLayout.aggregate_vector`.
        """
        self.included_node_ids = tuple(sorted(included_node_ids))
        self.aggregate = aggregate
        self.blinding_sums = blinding_sums
        self.aggregate_sha256 = commitments.aggregate_digest(aggregate)

        return CommitRequest(
            included_node_ids=self.included_node_ids,
            blinding_sums=tuple(int(value) for value in blinding_sums),
            aggregate_length=aggregate.size,
            aggregate_sha256=self.aggregate_sha256,
        )

    def receive_commitments(self, replies: Mapping[int, CommitReply]) -> None:
        """Keep the well-formed commitments of included clients.

        Signatures and group membership are checked later, by the audit.
        """
        for node, reply in sorted(replies.items()):
            if node not in self.included_node_ids:
                continue
            try:
                commitments.check_commitment("commitment", reply.commitment)
            except ValueError as error:
                logger.warning(
                    "Round %d: node %d sent a malformed commitment: %s",
                    self.server_round,
                    node,
                    error,
                )
                continue
            if len(reply.signature) != signatures.SIGNATURE_SIZE:
                logger.warning(
                    "Round %d: node %d sent a commitment signature of %d bytes",
                    self.server_round,
                    node,
                    len(reply.signature),
                )
                continue
            self.commitments[node] = reply.commitment
            self.commitment_signatures[node] = reply.signature

    def transcript(self) -> RoundTranscript:
        """Build the round's public transcript from what the clients sent."""
        aggregate, blinding_sums = self._fixed_aggregate()

        return RoundTranscript(
            run_id=self.run_id,
            server_round=self.server_round,
            included_node_ids=self.included_node_ids,
            identity_keys=self.identity_keys,
            key_list_signatures=self.key_list_signatures,
            aggregate_length=aggregate.size,
            aggregate_sha256=self.aggregate_sha256,
            model_sha256=self.model_sha256,
            settings_sha256=self.settings_sha256,
            blinding_sums=tuple(int(value) for value in blinding_sums),
            commitments=self.commitments,
            commitment_signatures=self.commitment_signatures,
        )

    def verify_request(
        self, node_id: int, round_transcript: RoundTranscript
    ) -> VerifyRequest:
        """Return the verify request for client `node_id`."""
        cached = self._transcript_json
        if cached is None or cached[0] is not round_transcript:
            cached = (round_transcript, round_transcript.to_json())
            self._transcript_json = cached
        return VerifyRequest(transcript=cached[1])

    def finish(
        self,
        round_transcript: RoundTranscript,
        replies: Mapping[int, VerifyReply],
        *,
        audit_path: Path | None = None,
        settings: RoundSettings | None = None,
    ) -> VerificationResult:
        """Audit the transcript, combine the clients' verdicts and record the round.

        The round is verified when the server's own audit passes and every
        included client that replied reports success. It is discarded when
        the audit finds included clients that did not commit, and every
        client that replied expects the discard. The first failure found is
        the reason. With `audit_path`, the transcript and aggregate
        are appended to that audit file, verified or not, with `settings` if
        given, so that an auditor can compute the model after the round.
        """
        aggregate, _ = self._fixed_aggregate()
        result = transcripts.audit_round(round_transcript, aggregate)
        if result.verified or result.discarded:
            result = _client_verdict(replies, self.included_node_ids, result)
        if audit_path is not None:
            audit.append_round(
                audit_path, round_transcript, aggregate, settings=settings
            )

        if result.verified:
            logger.info(
                "Round %d: aggregate verified, confirmed by %d of %d included clients",
                self.server_round,
                len(replies),
                len(self.included_node_ids),
            )
        elif result.discarded:
            logger.warning("Round %d: %s", self.server_round, result.reason)
        else:
            logger.warning(
                "Round %d: aggregate failed verification: %s",
                self.server_round,
                result.reason,
            )
        return result

    def _fixed_aggregate(
        self,
    ) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint32]]:
        if self.aggregate is None or self.blinding_sums is None:
            raise ProtocolError("The transcript must follow the commit request.")
        return self.aggregate, self.blinding_sums


def _client_verdict(
    replies: Mapping[int, VerifyReply],
    included_node_ids: Sequence[int],
    audit: VerificationResult,
) -> VerificationResult:
    """Combine the clients' replies with the server's passing or discarding audit.

    A client that reports another outcome than the audit's fails the round.
    A round that the audit discards stays discarded, so that its unchecked
    aggregate is never applied, and the reason names the client.
    """
    for node in sorted(replies):
        reply = replies[node]
        if node not in included_node_ids:
            continue
        if reply.verified == audit.verified and reply.discarded == audit.discarded:
            continue
        reason = reply.reason[:MAX_REASON_LENGTH] or "no reason given"
        if reply.verified:
            reason = "verified a round whose update the server must discard"
        if audit.discarded:
            return VerificationResult(
                False, f"{audit.reason}; node {node} reports: {reason}", discarded=True
            )
        return VerificationResult(False, f"node {node} reports: {reason}")

    return audit


# --- Client side -----------------------------------------------------------------


@dataclass(frozen=True)
class ClientVerificationState:
    """Verification state a client keeps between rounds and stages.

    Attributes:
        run_id: The run of the identity key.
        identity_private_key: The raw Ed25519 identity key of the run (secret).
        server_round: The round whose key list the client signed last.
        key_list_digest: The digest it signed in that round.
        input_round: The round whose update and blinding it keeps to commit.
        committed_round: The round it committed in and has no transcript of.
        commitment: Its encoded commitment in `committed_round`.
        aggregate_sha256: The digest of the aggregate it committed against.
        round_model_sha256: The `model_digest` of the global model it trained
            on in `input_round` or `committed_round`.
        round_settings_sha256: The `RoundSettings.digest` of the settings it
            trained with in that round.
        verified_round: The last round this client verified, or whose
            update it found discarded. Input requests of this round or an
            earlier one are rejected.
        next_model_sha256: The `model_digest` of the model that must follow
            `verified_round`: its model plus the decoded mean of its
            verified aggregate, its model itself if the round was
            discarded, or empty if the client could not compute it.
        failed_round: The first round of the run that failed verification.
        failure_reason: Why that round failed.

    """

    run_id: int
    identity_private_key: bytes
    server_round: int = 0
    key_list_digest: bytes = b""
    input_round: int = 0
    committed_round: int = 0
    commitment: bytes = b""
    aggregate_sha256: bytes = b""
    round_model_sha256: bytes = b""
    round_settings_sha256: bytes = b""
    verified_round: int = 0
    next_model_sha256: bytes = b""
    failed_round: int = 0
    failure_reason: str = ""

    @property
    def identity_public_key(self) -> bytes:
        """The 32-byte identity public key of the run."""
        return signatures.identity_public_bytes(self.identity_key())

    def identity_key(self) -> Ed25519PrivateKey:
        """Load the identity key of the run (secret)."""
        return signatures.load_identity_key(self.identity_private_key)

    def to_fields(self) -> Fields:
        """Convert to record fields for ``Context.state``."""
        return {
            "run-id": pack_node_ids([self.run_id]),
            "identity-private-key": self.identity_private_key,
            "server-round": self.server_round,
            "key-list-digest": self.key_list_digest,
            "input-round": self.input_round,
            "committed-round": self.committed_round,
            "commitment": self.commitment,
            "aggregate-sha256": self.aggregate_sha256,
            "round-model-sha256": self.round_model_sha256,
            "round-settings-sha256": self.round_settings_sha256,
            "verified-round": self.verified_round,
            "next-model-sha256": self.next_model_sha256,
            "failed-round": self.failed_round,
            "failure-reason": self.failure_reason,
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> ClientVerificationState:
        """Restore a state stored by `to_fields`."""
        run_id = unpack_single_id(fields, "run-id")
        return cls(
            run_id=run_id,
            identity_private_key=_field(fields, "identity-private-key", bytes),
            server_round=_field(fields, "server-round", int),
            key_list_digest=_field(fields, "key-list-digest", bytes),
            input_round=_field(fields, "input-round", int),
            committed_round=_field(fields, "committed-round", int),
            commitment=_field(fields, "commitment", bytes),
            aggregate_sha256=_field(fields, "aggregate-sha256", bytes),
            round_model_sha256=_field(fields, "round-model-sha256", bytes),
            round_settings_sha256=_field(fields, "round-settings-sha256", bytes),
            verified_round=_field(fields, "verified-round", int),
            next_model_sha256=_field(fields, "next-model-sha256", bytes),
            failed_round=_field(fields, "failed-round", int),
            failure_reason=_field(fields, "failure-reason", str),
        )


def client_identity(
    state: ClientVerificationState | None, *, run_id: int
) -> ClientVerificationState:
    """Return the state with this run's identity key, creating the key once per run."""
    if state is not None and state.run_id == run_id:
        return state

    key = signatures.generate_identity_key()
    return ClientVerificationState(
        run_id=run_id, identity_private_key=signatures.identity_private_bytes(key)
    )


def client_sign_key_list(
    state: ClientVerificationState,
    request: IdentityKeyList,
    *,
    run_id: int,
    server_round: int,
    node_id: int,
) -> tuple[ClientVerificationState, KeyListSignature]:
    """Sign the identity-key list of a round, after checking this client's own entry.

    Raises:
        ProtocolError: If the state belongs to another run, or the list contains
            no key or another key for this client.

    """
    _require_run(state, run_id)
    own_key = request.identity_keys.get(node_id)
    if own_key != state.identity_public_key:
        raise ProtocolError(
            "The identity-key list must contain this client's own identity key. "
            "Found it missing or replaced."
        )

    digest, signature = transcripts.sign_key_list(
        state.identity_key(),
        run_id=run_id,
        server_round=server_round,
        identity_keys=request.identity_keys,
    )
    new_state = replace(state, server_round=server_round, key_list_digest=digest)
    return new_state, KeyListSignature(signature=signature)


def client_start_input(
    state: ClientVerificationState,
    *,
    run_id: int,
    server_round: int,
    model_sha256: bytes,
    settings_sha256: bytes,
) -> ClientVerificationState:
    """Record that the client sends its input in this round, with a new blinding.

    ``model_sha256`` is the `model_digest` of the global model it trained on
    and ``settings_sha256`` the `RoundSettings.digest` of the settings it trained
    with; its commitment signature covers both.

    Raises:
        ProtocolError: If the client signed no key list in this round.

    """
    _require_signed(state, run_id, server_round)

    return replace(
        state,
        input_round=server_round,
        round_model_sha256=model_sha256,
        round_settings_sha256=settings_sha256,
    )


def client_commit(
    state: ClientVerificationState,
    request: CommitRequest,
    *,
    run_id: int,
    server_round: int,
    node_id: int,
    update: npt.NDArray[np.uint32],
    blinding: npt.NDArray[np.uint32],
) -> tuple[ClientVerificationState, CommitReply]:
    """Commit to this round's update against the released aggregate, once.

    The caller must delete the blinding vector once this returns: a second
    commitment with it under another seed would leak the update's
    projection difference.

    Raises:
        ProtocolError: If the client has no input of this round left to commit
            (it sent none, or already committed), is not among the included
            clients, or the aggregate's length differs from the update's.
        ValueError: If the request is malformed.

    """
    _require_signed(state, run_id, server_round)
    if state.input_round != server_round:
        raise ProtocolError(
            f"Commit requests for round {server_round} must follow this client's "
            "input of that round, and come once. Found no input left to commit."
        )

    commitment, signature = transcripts.client_commit(
        state.identity_key(),
        run_id=run_id,
        server_round=server_round,
        node_id=node_id,
        update=update,
        blinding=blinding,
        included_node_ids=request.included_node_ids,
        aggregate_length=request.aggregate_length,
        aggregate_sha256=request.aggregate_sha256,
        blinding_sums=np.array(request.blinding_sums, dtype=np.uint32),
        key_list_digest=state.key_list_digest,
        model_sha256=state.round_model_sha256,
        settings_sha256=state.round_settings_sha256,
    )
    new_state = replace(
        state,
        input_round=0,
        committed_round=server_round,
        commitment=commitment,
        aggregate_sha256=request.aggregate_sha256,
    )
    return new_state, CommitReply(commitment=commitment, signature=signature)


def client_verify(
    state: ClientVerificationState,
    request: VerifyRequest,
    *,
    run_id: int,
    server_round: int,
    node_id: int,
    aggregate: npt.NDArray[np.uint32],
    model_sha256: bytes,
) -> tuple[ClientVerificationState, VerifyReply]:
    """Check the round's transcript against the aggregate this client committed to.

    ``model_sha256`` is the `model_digest` of the model that the verify
    request carries, or empty if it carries none. It must be the model this
    client trained on, because the client computes the next model from it.
    A failure is recorded in the state, where `refusal_reason` finds it.

    Raises:
        ProtocolError: If the client did not commit in this round or already
            checked its transcript.

    """
    _require_signed(state, run_id, server_round)
    if state.committed_round != server_round:
        raise ProtocolError(
            f"Verify requests for round {server_round} must follow this client's "
            "commitment of that round, and come once. Found none pending."
        )

    result = _check_transcript(
        state, request, node_id=node_id, aggregate=aggregate, model_sha256=model_sha256
    )
    new_state = replace(
        state,
        committed_round=0,
        commitment=b"",
        aggregate_sha256=b"",
        round_model_sha256=b"",
        round_settings_sha256=b"",
    )
    if result.verified:
        new_state = replace(
            new_state, verified_round=server_round, next_model_sha256=b""
        )
    elif result.discarded:
        # The round's update must not be applied, so the next model is the
        # one this client trained on.
        new_state = replace(
            new_state,
            verified_round=server_round,
            next_model_sha256=state.round_model_sha256,
        )
    settled = result.verified or result.discarded
    if settled and state.failed_round == server_round:
        # Under the report policy the client trained on a model that failed
        # its model check; the server learns that here.
        result = VerificationResult(False, state.failure_reason)
    elif result.discarded:
        logger.warning("Round %d is discarded: %s", server_round, result.reason)
    if not (result.verified or result.discarded):
        logger.warning("Round %d failed verification: %s", server_round, result.reason)
        if not state.failed_round:
            new_state = replace(
                new_state, failed_round=server_round, failure_reason=result.reason
            )
    return new_state, VerifyReply(
        verified=result.verified, reason=result.reason, discarded=result.discarded
    )


def client_expect_model(
    state: ClientVerificationState, *, server_round: int, model_sha256: bytes
) -> ClientVerificationState:
    """Keep the digest of the model that must follow a verified round.

    The caller computes it from the round's model and verified aggregate
    exactly as the server does, so an honest server's next model matches.

    Raises:
        ProtocolError: If ``server_round`` is not the round the client
            verified last.

    """
    if state.verified_round != server_round:
        raise ProtocolError(
            f"The next model must follow the last verified round "
            f"{state.verified_round}. Found round {server_round}."
        )
    return replace(state, next_model_sha256=model_sha256)


def client_check_model(
    state: ClientVerificationState,
    *,
    server_round: int,
    model_sha256: Callable[[], bytes],
) -> ClientVerificationState:
    """Check an input request against the last round this client verified.

    An input request of that round or an earlier one fails, because round
    numbers only increase. In the round right after it, the global model
    must be the one the verified round implies, and any model fails if the
    client could not compute that one: an honest server cannot release a
    model from an aggregate that does not decode. A later round is not
    checked: rounds the client did not see changed the model. A failure is
    recorded as this round's, where `refusal_reason` finds it. The digest is
    computed, by calling ``model_sha256``, only when it is needed. The
    expectation stays until the next verified round, so every input
    request of the round is checked.
    """
    verified = state.verified_round
    if not verified or server_round > verified + 1:
        return state
    if server_round <= verified:
        reason = (
            f"the server sent an input request for round {server_round} after this "
            f"client verified round {verified}, and round numbers must increase"
        )
    elif not state.next_model_sha256:
        reason = (
            f"this client could not compute the model that follows round "
            f"{verified}, so no model of round {server_round} can be the right one"
        )
    elif model_sha256() == state.next_model_sha256:
        return state
    else:
        reason = (
            f"the model sent for round {server_round} is not the one that round "
            f"{verified} implies: its model plus the mean of its verified "
            "aggregate, or its model unchanged if it was discarded"
        )

    logger.warning("Round %d failed verification: %s", server_round, reason)
    if state.failed_round:
        return state
    return replace(state, failed_round=server_round, failure_reason=reason)


def _check_transcript(
    state: ClientVerificationState,
    request: VerifyRequest,
    *,
    node_id: int,
    aggregate: npt.NDArray[np.uint32],
    model_sha256: bytes,
) -> VerificationResult:
    try:
        untrusted = RoundTranscript.from_json(request.transcript)
    except ValueError as error:
        return VerificationResult(False, f"the transcript is malformed: {error}")
    if aggregate.size == 0:
        return VerificationResult(
            False, "the aggregate is malformed: it is empty or could not be read"
        )
    try:
        digest = commitments.aggregate_digest(aggregate)
    except ValueError as error:
        return VerificationResult(False, f"the aggregate is malformed: {error}")
    if digest != state.aggregate_sha256:
        return VerificationResult(
            False, "the aggregate differs from the one this client committed to"
        )

    result = transcripts.verify_round_as_client(
        untrusted,
        aggregate,
        run_id=state.run_id,
        server_round=state.server_round,
        node_id=node_id,
        identity_public_key=state.identity_public_key,
        key_list_digest=state.key_list_digest,
        commitment=state.commitment,
        model_sha256=state.round_model_sha256,
        settings_sha256=state.round_settings_sha256,
    )
    if result.verified and model_sha256 != state.round_model_sha256:
        return VerificationResult(
            False, "the verify request does not carry the model this client trained on"
        )
    return result


def refusal_reason(
    state: ClientVerificationState | None,
    *,
    run_id: int,
    server_round: int,
    policy: FailurePolicy,
    require_verification: bool,
) -> str:
    """Return why a client must not train on this round's model, or "".

    Under the ``refuse`` policy a client refuses every model of a run after
    a round failed verification, and after a round in which it committed but
    received no transcript: the server withheld the proof. With
    `require_verification` it also refuses a round whose key list it did not
    sign, because that round will not be verified.
    """
    current = state if state is not None and state.run_id == run_id else None
    if current is not None and policy is FailurePolicy.REFUSE:
        if current.failed_round:
            return (
                f"round {current.failed_round} failed verification "
                f"({current.failure_reason}), so this client does not train on "
                "later models of the run"
            )
        if current.committed_round and current.committed_round < server_round:
            return (
                f"round {current.committed_round} was not verified: no transcript "
                "arrived after this client committed"
            )
    signed = current is not None and current.server_round == server_round
    if require_verification and not signed:
        return "this client requires verification, and the round does not verify"

    return ""


def _require_run(state: ClientVerificationState, run_id: int) -> None:
    if state.run_id != run_id:
        raise ProtocolError(
            f"The verification state belongs to run {state.run_id}. "
            f"Found a request for run {run_id}."
        )


def _require_signed(
    state: ClientVerificationState, run_id: int, server_round: int
) -> None:
    _require_run(state, run_id)
    if state.server_round != server_round or not state.key_list_digest:
        raise ProtocolError(
            f"Round {server_round} must start with a signed identity-key list. "
            f"Found the last signed list in round {state.server_round}."
        )
