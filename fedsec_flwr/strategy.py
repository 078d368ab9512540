"""Federated averaging whose server sees only the masked sum of client updates.

``SecureFedAvg`` runs its own round loop over the Grid, because one round of
secure aggregation takes four exchanges with the clients (setup, share keys,
masked input, unmask) instead of Flower's single train exchange. With
``secure_aggregation=None`` the same loop runs plain weighted FedAvg, so both
modes share sampling, update handling and reporting. With ``verification``,
each round adds a commit and a verify exchange, after which the clients and
the server check that the aggregate is the sum of the included updates.

Both modes average the update (client weights minus global weights), weighted
by each client's ``num-examples``, and add it to the global model.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from ._scalars import plain_number
from .config import KEY_LIFETIME_RUN, SecAggConfig
from .core.commitments import VerificationResult
from .core.errors import TooFewSurvivorsError
from .core.run_keys import KeyDirectory
from .core.server import plan_round
from .models import FloatLayout
from .privacy import DPConfig, DPMode, RoundNotPlannedError, ServerPrivacy
from .records import arrays_to_numpy
from .rounds import (
    PendingVerification,
    PrivacyRound,
    RoundOutcome,
    apply_step,
    finish_verification,
    run_plain_round,
    run_plain_verified_round,
    run_secure_round,
)
from .server_momentum import MomentumState, ServerMomentum
from .verification import (
    FailurePolicy,
    VerificationConfig,
    VerificationError,
    check_blinding_capacity,
)

logger = logging.getLogger("fedsec_flwr.strategy")

NODE_WAIT_INTERVAL = 1.0

NODE_WAIT_LOG_INTERVAL = 30.0
"""Seconds between warnings while a round waits for ``min_available_nodes``."""

SAMPLING_FIXED = "fixed"
SAMPLING_POISSON = "poisson"

MAX_SHORT_ROUND_PROBABILITY = 0.01
"""Largest accepted chance that Poisson sampling stops a run.

It applies to rounds with too few clients and, separately, to rounds with
more than ``max_clients``.
"""


@dataclass
class RoundReport:
    """Summary of one round, for logs and results files.

    Attributes:
        server_round: Round number, from 1.
        num_sampled: Clients sampled for the round.
        num_aggregated: Clients whose update is in the aggregate.
        num_dropped: Sampled clients whose update is not in it.
        dropped_by_stage: Clients lost at each protocol stage; in secure mode a
            client lost at the unmask stage is still aggregated.
        seconds: Wall time of the round, evaluation excluded.
        upload_bytes: Bytes of record payload each client sent in the round.
        download_bytes: Bytes of record payload sent to each client.
        clipped_coordinates: Update coordinates clipped to the encoding range,
            summed over the aggregated clients; 0 under DP, where the clients
            keep the count.
        train_metrics: Mean of the clients' training metrics.
        evaluate_metrics: The central evaluation after the round.
        epsilon: Client-level epsilon spent so far under DP, else ``None``.
        epsilon_against_server: In distributed mode, the epsilon of a client
            that took part in every round so far, without amplification by
            sampling, which does not hold against the server that samples.
            ``None`` in central mode and without DP.
        clipping_norm: The round's DP clipping norm, else ``None``.
        noise_multiplier: The round's DP noise multiplier, else ``None``.
        verified: Whether the round's aggregate passed verification: the
            server's audit of the transcript and every included client that
            replied. ``None`` without verification.
        timings: Wall seconds of each part of a secure round, by stage name
            (each includes the clients' work in it), plus ``verification``
            and ``decode`` on the server.
        verification_reason: The first failed check when ``verified`` is
            ``False``, else "".
        discarded: Whether the round's update was discarded because
            included clients did not commit, so that the aggregate could not
            be checked. The model after the round is then the model before
            it, and ``verified`` is ``False``.

    """

    server_round: int
    num_sampled: int
    num_aggregated: int
    num_dropped: int
    dropped_by_stage: dict[str, int]
    seconds: float
    upload_bytes: dict[int, int]
    download_bytes: dict[int, int]
    clipped_coordinates: int
    train_metrics: dict[str, float] = field(default_factory=dict)
    evaluate_metrics: dict[str, float] = field(default_factory=dict)
    epsilon: float | None = None
    epsilon_against_server: float | None = None
    clipping_norm: float | None = None
    noise_multiplier: float | None = None
    verified: bool | None = None
    verification_reason: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    discarded: bool = False


RoundCallback = Callable[[RoundReport], None]
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]

DEFAULT_SECAGG = SecAggConfig()


def poisson_short_round_probability(
    *, num_nodes: int, sample_rate: float, min_sampled: int
) -> float:
    """Return the probability that Poisson sampling draws fewer than `min_sampled`.

    The count of sampled nodes is Binomial(num_nodes, sample_rate).
    """
    counts = range(min(min_sampled, num_nodes + 1))
    return _binomial_mass(num_nodes, sample_rate, counts)


def poisson_long_round_probability(
    *, num_nodes: int, sample_rate: float, max_sampled: int
) -> float:
    """Return the probability that Poisson sampling draws more than `max_sampled`."""
    counts = range(max_sampled + 1, num_nodes + 1)
    return _binomial_mass(num_nodes, sample_rate, counts)


def _binomial_mass(num_nodes: int, sample_rate: float, counts: range) -> float:
    return sum(
        math.comb(num_nodes, count)
        * sample_rate**count
        * (1.0 - sample_rate) ** (num_nodes - count)
        for count in counts
    )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_types(
    *,
    secure_aggregation: object,
    differential_privacy: object,
    verification: object,
    on_round_end: object,
    rng: object,
    server_momentum: object,
) -> None:
    """Reject arguments of the wrong type before they fail deep in a round."""
    expected = (
        ("secure_aggregation", secure_aggregation, SecAggConfig, "a SecAggConfig"),
        ("differential_privacy", differential_privacy, DPConfig, "a DPConfig"),
        ("rng", rng, random.Random, "a random.Random"),
        ("server_momentum", server_momentum, ServerMomentum, "a ServerMomentum"),
    )
    for name, value, kind, description in expected:
        if value is not None and not isinstance(value, kind):
            raise ValueError(
                f"{name} must be {description} or None. "
                f"Found {type(value).__name__} {value!r}."
            )
    if not isinstance(verification, bool | VerificationConfig):
        raise ValueError(
            "verification must be a bool or a VerificationConfig. "
            f"Found {type(verification).__module__}.{type(verification).__qualname__}."
        )
    if on_round_end is not None and not callable(on_round_end):
        raise ValueError(
            "on_round_end must be callable or None. "
            f"Found {type(on_round_end).__name__}."
        )


class SecureFedAvg(Strategy):
    """Weighted FedAvg over SecAgg+ secure aggregation.

    Args:
        secure_aggregation: The secure-aggregation parameters; pass ``None``
            to run plain FedAvg, in which the server sees every client's model.
        fraction_train: Fraction of the connected nodes sampled each round.
        min_train_nodes: Fewest nodes sampled in a round.
        min_available_nodes: Nodes to wait for before the first round.
        plain_timeout: Seconds to wait for replies in plain mode.
        differential_privacy: Client-level DP; ``None`` for none.
        client_sampling: ``fixed`` samples ``fraction_train`` of the nodes;
            ``poisson`` samples each node with that probability.
        verification: Commitment-based verification of every round's
            aggregate: ``True`` for the defaults, a `VerificationConfig`, or
            ``False``. Central DP cannot be verified, because the verifiers
            would see the aggregate before the server adds the noise.
        on_round_end: Called with each round's report after evaluation.
        server_momentum: Server learning rate and momentum applied to each
            round's mean update (FedAvgM); ``None`` adds the mean update
            as it is. Not with verification, whose clients check that the
            next model is the previous one plus the verified mean.
        rng: Source of sampling and graph randomness; a
            ``random.SystemRandom`` by default. A seeded generator makes the
            client sample predictable from its seed, which voids the
            amplification by Poisson sampling under DP, so the strategy
            warns then.

    """

    def __init__(
        self,
        *,
        secure_aggregation: SecAggConfig | None = DEFAULT_SECAGG,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        min_available_nodes: int = 2,
        plain_timeout: float = 600.0,
        differential_privacy: DPConfig | None = None,
        client_sampling: str = SAMPLING_FIXED,
        on_round_end: RoundCallback | None = None,
        rng: random.Random | None = None,
        verification: VerificationConfig | bool = False,
        server_momentum: ServerMomentum | None = None,
    ) -> None:
        _check_types(
            secure_aggregation=secure_aggregation,
            differential_privacy=differential_privacy,
            verification=verification,
            on_round_end=on_round_end,
            rng=rng,
            server_momentum=server_momentum,
        )
        fraction_train = plain_number(fraction_train)
        min_train_nodes = plain_number(min_train_nodes)
        min_available_nodes = plain_number(min_available_nodes)
        plain_timeout = plain_number(plain_timeout)
        if not _is_number(fraction_train) or not 0.0 < fraction_train <= 1.0:
            raise ValueError(
                f"fraction_train must be in (0, 1]. Found {fraction_train!r}."
            )
        for name, count in (
            ("min_train_nodes", min_train_nodes),
            ("min_available_nodes", min_available_nodes),
        ):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(
                    f"{name} must be an int of at least 1. Found {count!r}."
                )
        if not _is_number(plain_timeout) or not (
            math.isfinite(plain_timeout) and plain_timeout > 0
        ):
            raise ValueError(
                "plain_timeout must be a finite number of seconds above 0. "
                f"Found {plain_timeout!r}."
            )
        if (
            secure_aggregation is not None
            and min_train_nodes > secure_aggregation.max_clients
        ):
            raise ValueError(
                "min_train_nodes must not exceed secure_aggregation.max_clients "
                f"{secure_aggregation.max_clients}, or no round can start. "
                f"Found {min_train_nodes}."
            )
        if min_available_nodes < min_train_nodes:
            raise ValueError(
                "min_available_nodes must be at least min_train_nodes "
                f"{min_train_nodes}. Found {min_available_nodes!r}."
            )
        if secure_aggregation is not None and min_train_nodes < 2:
            raise ValueError(
                "min_train_nodes must be at least 2 with secure aggregation. "
                f"Found {min_train_nodes}."
            )
        if client_sampling not in (SAMPLING_FIXED, SAMPLING_POISSON):
            raise ValueError(
                f"client_sampling must be {SAMPLING_FIXED!r} or "
                f"{SAMPLING_POISSON!r}. Found {client_sampling!r}."
            )
        if (
            differential_privacy is not None
            and differential_privacy.mode is DPMode.DISTRIBUTED
            and secure_aggregation is None
        ):
            raise ValueError(
                "Distributed DP needs secure aggregation: clients add noise inside "
                "the secure sum. Found secure_aggregation=None."
            )
        self.verification = _verification_config(
            verification, secure_aggregation, differential_privacy
        )
        if server_momentum is not None and self.verification is not None:
            # TODO: let verifying clients predict the model after momentum.
            raise ValueError(
                "server_momentum cannot be combined with verification: each "
                "verifying client checks that the next model is the previous "
                "model plus the verified mean update, which momentum changes. "
                f"Found server_momentum={server_momentum!r}."
            )
        self.server_momentum = server_momentum
        self.secure_aggregation = secure_aggregation
        self.differential_privacy = differential_privacy
        weighted = self._encoding_limit()
        if weighted is not None and differential_privacy is None:
            weighted.warn_if_imprecise()
        self.client_sampling = client_sampling
        self.stopped_reason: str | None = None
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.min_available_nodes = min_available_nodes
        self.plain_timeout = plain_timeout
        self.on_round_end = on_round_end
        self.rng = rng or random.SystemRandom()
        self._poisson_checked_nodes = 0
        seeded = not isinstance(self.rng, random.SystemRandom)
        poisson_dp = differential_privacy and client_sampling == SAMPLING_POISSON
        if poisson_dp and self.verification is not None:
            logger.warning(
                "Verified rounds name their clients in the transcript that every "
                "client and auditor sees, and divide by their count, so the "
                "privacy amplification by Poisson sampling holds only against "
                "parties that see neither the transcripts nor the released models."
            )
        if seeded and poisson_dp:
            logger.warning(
                "rng is a %s, so anyone who knows its seed can predict the "
                "Poisson sample, while the privacy amplification by sampling "
                "assumes it secret. Leave rng unset for a random.SystemRandom.",
                type(self.rng).__name__,
            )
        self._key_directory = KeyDirectory()
        self._num_available = 0
        self._evaluate_fn: EvaluateFn | None = None
        self._result = Result()

    def summary(self) -> None:
        """Log the strategy's configuration."""
        mode = "plain FedAvg" if self.secure_aggregation is None else "SecAgg+"
        logger.info(
            "SecureFedAvg (%s): fraction_train=%s, min_train_nodes=%d",
            mode,
            self.fraction_train,
            self.min_train_nodes,
        )
        if self.secure_aggregation is not None:
            logger.info("Secure aggregation: %s", self.secure_aggregation)
        if self.server_momentum is not None:
            logger.info(
                "Server momentum: learning_rate=%s, momentum=%s",
                self.server_momentum.learning_rate,
                self.server_momentum.momentum,
            )
        if self.verification is not None:
            logger.info(
                "Verification: on_failure=%s, audit_path=%s",
                self.verification.on_failure.value,
                self.verification.audit_path,
            )

    # The four hooks below belong to Flower's single-exchange round loop, which
    # ``start`` replaces; they exist because ``Strategy`` declares them.
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Return no messages: ``start`` runs the training exchanges itself."""
        return []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Return nothing: ``start`` aggregates through its own exchanges."""
        return None, None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Return no messages: evaluation is central, through ``evaluate_fn``."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Return nothing: there is no client-side evaluation."""
        return None

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        """Run ``num_rounds`` rounds and return the final model and metrics.

        ``timeout`` bounds the wait for ``min_available_nodes``; each protocol
        stage has its own timeout in the secure-aggregation config.

        Raises:
            TooFewSurvivorsError: A round lost too many clients; no model from
                that round is released.
            VerificationError: A round failed verification under the
                ``refuse`` policy; no model from that round is released.

        """
        self.summary()
        train_config = train_config or ConfigRecord()
        result = Result(arrays=initial_arrays)
        if evaluate_fn is not None:
            initial = evaluate_fn(0, initial_arrays)
            if initial is not None:
                result.evaluate_metrics_serverapp[0] = initial

        arrays = initial_arrays
        initial_numpy = arrays_to_numpy(initial_arrays)
        dimension = FloatLayout.of(initial_numpy).size
        non_float_keys = [
            key
            for key, value in initial_numpy.items()
            if not np.issubdtype(value.dtype, np.floating)
        ]
        if non_float_keys:
            logger.info(
                "Arrays that are not floating point are not aggregated; the global "
                "model keeps them as they are: %s",
                ", ".join(non_float_keys),
            )
        privacy = self._privacy(num_rounds)
        momentum = MomentumState(self.server_momentum) if self.server_momentum else None
        self._key_directory = KeyDirectory()
        self._evaluate_fn = evaluate_fn
        self._result = result
        # Under pipelined verification the report of a round waits until the
        # next round, or the end of the run, brings its result.
        pending: PendingVerification | None = None
        waiting_report: RoundReport | None = None
        for server_round in range(1, num_rounds + 1):
            started = time.perf_counter()
            nodes = self._sample_nodes(
                grid, server_round, timeout, num_rounds=num_rounds
            )
            round_privacy = None
            if privacy is not None:
                try:
                    plan = privacy.plan(
                        num_sampled=len(nodes),
                        dimension=dimension,
                        expected_clients=self._expected_clients(),
                    )
                except RoundNotPlannedError as error:
                    reason: str | None = str(error)
                else:
                    reason = privacy.budget_exceeded(plan, dimension=dimension)
                if reason is not None:
                    self.stopped_reason = (
                        f"Stopped before round {server_round}: {reason}."
                    )
                    logger.warning("%s", self.stopped_reason)
                    break
                round_privacy = PrivacyRound(privacy, plan, dimension)

            try:
                outcome = self._run_round(
                    grid,
                    server_round,
                    nodes,
                    arrays,
                    train_config,
                    round_privacy,
                    pending,
                )
            except Exception:
                # The previous round's model was released; report it even
                # though this round fails.
                if pending is not None and waiting_report is not None:
                    self._release_unfinished(waiting_report, pending, server_round)
                raise
            if outcome.previous is not None and waiting_report is not None:
                self._release(waiting_report, outcome.previous)
            self._check_verified(server_round, outcome.verification)
            if momentum is not None and outcome.mean_update is not None:
                step = momentum.step(outcome.mean_update)
                arrays = apply_step(arrays, step, server_round)
            else:
                arrays = outcome.arrays
            seconds = time.perf_counter() - started

            evaluation = evaluate_fn(server_round, arrays) if evaluate_fn else None
            report = _report(server_round, len(nodes), outcome, seconds, evaluation)
            if round_privacy is not None:
                report.clipping_norm = round_privacy.plan.clipping_norm
                report.noise_multiplier = round_privacy.plan.noise_multiplier
                report.epsilon_against_server = (
                    round_privacy.server.epsilon_against_server
                )
            result.arrays = arrays
            result.train_metrics_clientapp[server_round] = MetricRecord(
                dict(outcome.train_metrics)
            )
            if evaluation is not None:
                result.evaluate_metrics_serverapp[server_round] = evaluation
            logger.info(
                "Round %d: aggregated %d of %d clients in %.2f s",
                server_round,
                report.num_aggregated,
                report.num_sampled,
                seconds,
            )
            pending = outcome.pending
            if pending is None:
                self._emit(report)
            else:
                waiting_report = report
        if pending is not None and waiting_report is not None:
            last = self._finish_pending(grid, pending, waiting_report)
            if last.discarded:
                result.arrays = pending.model
        return result

    def _emit(self, report: RoundReport) -> None:
        if self.on_round_end is not None:
            self.on_round_end(report)

    def _release(self, report: RoundReport, verified: PendingVerification) -> None:
        """Add a pipelined round's verification to its report and emit it."""
        if verified.result is not None:
            report.verified = verified.result.verified
            report.verification_reason = verified.result.reason
            report.discarded = verified.result.discarded
        report.dropped_by_stage.update(verified.dropped_by_stage)
        if report.discarded:
            self._evaluate_kept_model(report, verified.model)
        self._emit(report)

    def _evaluate_kept_model(self, report: RoundReport, model: ArrayRecord) -> None:
        """Evaluate again the model that a discarded pipelined round keeps.

        The round was evaluated on the model its aggregate would give, which
        is never released, so the report and the result get the metrics of
        the model the round trained on.
        """
        if self._evaluate_fn is None:
            return
        evaluation = self._evaluate_fn(report.server_round, model)
        report.evaluate_metrics = _metric_values(evaluation)
        if evaluation is None:
            self._result.evaluate_metrics_serverapp.pop(report.server_round, None)
        else:
            self._result.evaluate_metrics_serverapp[report.server_round] = evaluation

    def _release_unfinished(
        self, report: RoundReport, pending: PendingVerification, failed_round: int
    ) -> None:
        """Emit a pipelined round's report when the round after it fails."""
        if pending.result is None:
            report.verification_reason = (
                f"round {failed_round} failed before this round's verification finished"
            )
        self._release(report, pending)

    def _finish_pending(
        self, grid: Grid, pending: PendingVerification, report: RoundReport
    ) -> VerificationResult:
        """Verify the last round of a pipelined run with exchanges of its own."""
        started = time.perf_counter()
        secagg = self.secure_aggregation or DEFAULT_SECAGG
        result = finish_verification(grid, pending, timeout=secagg.stage_timeout)
        report.seconds += time.perf_counter() - started
        # A failed round is reported before the refuse policy raises.
        self._release(report, pending)
        self._check_verified(pending.server_round, result)
        return result

    def _check_verified(
        self, server_round: int, result: VerificationResult | None
    ) -> None:
        if self.verification is None or result is None:
            return
        if result.verified or result.discarded:
            return
        if self.verification.on_failure is FailurePolicy.REFUSE:
            raise VerificationError(
                f"Round {server_round}: the aggregate failed verification: "
                f"{result.reason}. No model from this round is released."
            )

    def check_privacy_target(
        self,
        num_rounds: int,
        *,
        num_nodes: int | None = None,
        initial_arrays: ArrayRecord | None = None,
    ) -> None:
        """Raise now if the DP target cannot be met in ``num_rounds``.

        ``start`` finds the same problem in round 1; this lets a caller
        check a configuration before it starts a run. Central mode needs
        nothing else. Distributed mode's noise multiplier depends on the
        round's clients and the model's size, so it is checked only with
        ``num_nodes`` and ``initial_arrays``, for the number of clients a
        round samples from that many nodes (the expected number under
        Poisson sampling).

        Raises:
            TargetEpsilonUnreachableError: If the target needs a noise
                multiplier above the search limit.
            ValueError: If ``num_rounds`` or ``num_nodes`` is below 1.
        """
        if num_rounds < 1:
            raise ValueError(f"num_rounds must be at least 1. Found {num_rounds}.")
        if num_nodes is not None and num_nodes < 1:
            raise ValueError(f"num_nodes must be at least 1. Found {num_nodes}.")
        privacy = self._privacy(num_rounds)
        if privacy is None:
            return
        if num_nodes is None or initial_arrays is None:
            privacy.check_target()
            return
        dimension = FloatLayout.of(arrays_to_numpy(initial_arrays)).size
        num_sampled = min(self._planned_count(num_nodes), privacy.max_clients)
        privacy.check_target(num_sampled=num_sampled, dimension=dimension)

    def check_node_count(self, num_nodes: int, num_rounds: int) -> None:
        """Raise now if exactly ``num_nodes`` nodes cannot run ``num_rounds`` rounds.

        For a federation whose nodes are known before it starts, such as a
        simulation: too few nodes would make round 1 wait until its timeout,
        and a sample above the encoding's ``max_clients``, or a Poisson
        sample size that is likely out of range, would stop the run.

        Raises:
            ValueError: If the nodes cannot run the rounds.
        """
        # The constructor keeps min_available_nodes >= min_train_nodes.
        if num_nodes < self.min_available_nodes:
            raise ValueError(
                f"min_available_nodes {self.min_available_nodes} is above the "
                f"{num_nodes} nodes, so round 1 would wait until its timeout."
            )
        count = self._planned_count(num_nodes)
        if self.client_sampling == SAMPLING_POISSON:
            self._check_poisson_sample_size(num_nodes, num_rounds)
            self._check_graph(count)
            return

        encoding = self._encoding_limit()
        if encoding is not None and count > encoding.max_clients:
            raise ValueError(
                f"fraction_train {self.fraction_train} of {num_nodes} nodes samples "
                f"{count} clients per round, more than max_clients "
                f"{encoding.max_clients} of the encoding config."
            )
        self._check_graph(count)

    def _check_graph(self, count: int) -> None:
        """Plan the neighbour graph of a round of ``count`` clients, as rounds do.

        A threshold above the share holders of the graph that the default
        degree gives ``count`` clients would otherwise stop round 1.
        """
        secagg = self.secure_aggregation
        if secagg is None or count < 2:
            return
        try:
            plan_round(
                list(range(count)),
                num_neighbours=secagg.num_neighbours,
                threshold=secagg.threshold,
                rng=random.Random(0),
            )
        except TooFewSurvivorsError as error:
            raise ValueError(str(error)) from error

    def _planned_count(self, num_nodes: int) -> int:
        """Clients a round samples from ``num_nodes`` nodes; expected under Poisson."""
        if self.client_sampling == SAMPLING_POISSON:
            return max(1, round(self.fraction_train * num_nodes))
        return min(
            num_nodes, max(self.min_train_nodes, int(self.fraction_train * num_nodes))
        )

    def _privacy(self, num_rounds: int) -> ServerPrivacy | None:
        config = self.differential_privacy
        if config is None:
            return None
        secagg = self.secure_aggregation
        sample_rate = 1.0
        if self.client_sampling == SAMPLING_POISSON:
            sample_rate = self.fraction_train
        return ServerPrivacy(
            config=config,
            num_rounds=num_rounds,
            sample_rate=sample_rate,
            max_clients=secagg.max_clients if secagg else 1,
            modulus=secagg.modulus if secagg else None,
            verified=self.verification is not None,
        )

    def _run_round(
        self,
        grid: Grid,
        server_round: int,
        nodes: list[int],
        arrays: ArrayRecord,
        train_config: ConfigRecord,
        privacy: PrivacyRound | None,
        previous: PendingVerification | None,
    ) -> RoundOutcome:
        if self.secure_aggregation is None and self.verification is not None:
            return run_plain_verified_round(
                grid,
                server_round=server_round,
                nodes=nodes,
                arrays=arrays,
                train_config=train_config,
                timeout=self.plain_timeout,
                verification=self.verification,
            )
        if self.secure_aggregation is None:
            return run_plain_round(
                grid,
                server_round=server_round,
                nodes=nodes,
                arrays=arrays,
                train_config=train_config,
                timeout=self.plain_timeout,
                privacy=privacy,
            )
        return run_secure_round(
            grid,
            server_round=server_round,
            nodes=nodes,
            arrays=arrays,
            train_config=train_config,
            config=self.secure_aggregation,
            rng=self.rng,
            privacy=privacy,
            verification=self.verification,
            directory=self._key_directory,
            previous=previous,
            on_verified=self._check_verified,
        )

    def _sample_nodes(
        self, grid: Grid, server_round: int, timeout: float, *, num_rounds: int
    ) -> list[int]:
        deadline = time.monotonic() + timeout
        # Nodes usually connect within seconds, so only a longer wait gets a
        # warning, which shows even without any logging set up.
        next_log = time.monotonic() + NODE_WAIT_LOG_INTERVAL
        available = sorted(grid.get_node_ids())
        while len(available) < self.min_available_nodes:
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(
                    f"Only {len(available)} node(s) connected within {timeout} s; "
                    f"min_available_nodes is {self.min_available_nodes}."
                )
            if now >= next_log:
                logger.warning(
                    "Round %d waits for %d node(s) with %d connected, and "
                    "stops waiting in %.0f s, at the strategy's timeout",
                    server_round,
                    self.min_available_nodes,
                    len(available),
                    deadline - now,
                )
                next_log = now + NODE_WAIT_LOG_INTERVAL
            time.sleep(NODE_WAIT_INTERVAL)
            available = sorted(grid.get_node_ids())
        self._num_available = len(available)

        if self.client_sampling == SAMPLING_POISSON:
            self._check_poisson_population(server_round, len(available), num_rounds)
            chosen = [n for n in available if self.rng.random() < self.fraction_train]
            if len(chosen) < self.min_train_nodes:
                raise TooFewSurvivorsError(
                    f"Round {server_round}: Poisson sampling with probability "
                    f"{self.fraction_train} chose {len(chosen)} of {len(available)} "
                    f"nodes, fewer than min_train_nodes {self.min_train_nodes}."
                )
            return self._check_limit(server_round, sorted(chosen))

        count = max(self.min_train_nodes, int(self.fraction_train * len(available)))
        count = min(count, len(available))
        return self._check_limit(
            server_round, sorted(self.rng.sample(available, count))
        )

    def _expected_clients(self) -> float | None:
        """Return q * N under Poisson sampling, for N nodes sampled from, else None.

        Verified rounds divide by the count aggregated, because the clients
        and the auditor rebuild the next model that way. Their transcripts
        name the included clients anyway.
        """
        if self.client_sampling != SAMPLING_POISSON or self.verification is not None:
            return None
        return self.fraction_train * self._num_available

    def _check_poisson_population(
        self, server_round: int, num_nodes: int, num_rounds: int
    ) -> None:
        """Check the Poisson sample size before round 1 and when the node count changes.

        Before round 1 a likely short or long round is an error. Nodes that
        connect or leave later change the chance of a round below
        ``min_train_nodes`` or above ``max_clients``. Then the run goes on,
        and a warning gives the new chance over the rounds left if it is
        too high.
        """
        if server_round == 1:
            self._check_poisson_sample_size(num_nodes, num_rounds)
            self._poisson_checked_nodes = num_nodes
            return
        if num_nodes == self._poisson_checked_nodes:
            return

        self._poisson_checked_nodes = num_nodes
        rounds_left = max(1, num_rounds - server_round + 1)
        try:
            self._check_poisson_sample_size(num_nodes, rounds_left)
        except ValueError as error:
            logger.warning("Round %d: %s", server_round, error)

    def _check_poisson_sample_size(self, num_nodes: int, num_rounds: int) -> None:
        """Raise if some round would likely draw too few or too many clients.

        A round that draws fewer than ``min_train_nodes`` clients, or more
        than the encoding's ``max_clients``, cannot run and cannot be skipped
        quietly, since whether it runs depends on who was sampled. So a
        setting where either is likely is rejected before round 1.
        """
        short = poisson_short_round_probability(
            num_nodes=num_nodes,
            sample_rate=self.fraction_train,
            min_sampled=self.min_train_nodes,
        )
        self._check_stop_chance(
            short,
            num_nodes=num_nodes,
            num_rounds=num_rounds,
            event=f"fewer than min_train_nodes {self.min_train_nodes}",
            remedy="Raise fraction_train or the number of nodes, or sample with "
            f"client_sampling={SAMPLING_FIXED!r}.",
        )

        encoding = self._encoding_limit()
        if encoding is None:
            return
        long = poisson_long_round_probability(
            num_nodes=num_nodes,
            sample_rate=self.fraction_train,
            max_sampled=encoding.max_clients,
        )
        self._check_stop_chance(
            long,
            num_nodes=num_nodes,
            num_rounds=num_rounds,
            event=f"more than max_clients {encoding.max_clients}",
            remedy="Raise max_clients or lower fraction_train.",
        )

    def _check_stop_chance(
        self,
        per_round: float,
        *,
        num_nodes: int,
        num_rounds: int,
        event: str,
        remedy: str,
    ) -> None:
        """Raise if an event of chance ``per_round`` is too likely over the run."""
        failure = 1.0 - (1.0 - per_round) ** num_rounds
        if failure > MAX_SHORT_ROUND_PROBABILITY:
            raise ValueError(
                f"Poisson sampling with fraction_train {self.fraction_train} over "
                f"{num_nodes} nodes draws {event} in at least one of {num_rounds} "
                f"rounds with probability {failure:.3g}, above "
                f"{MAX_SHORT_ROUND_PROBABILITY}, and such a round stops the run. "
                f"{remedy}"
            )

    def _encoding_limit(self) -> SecAggConfig | None:
        """Return the config whose max_clients bounds a round, if any."""
        encoding = self.secure_aggregation
        if encoding is None and self.verification is not None:
            encoding = self.verification.plain_encoding
        return encoding

    def _check_limit(self, server_round: int, nodes: list[int]) -> list[int]:
        count = len(nodes)
        encoding = self._encoding_limit()
        if encoding is not None and count > encoding.max_clients:
            raise ValueError(
                f"Round {server_round} would sample {count} clients, more than "
                f"max_clients {encoding.max_clients} of the encoding config."
            )
        if self.secure_aggregation is not None and count == 2:
            logger.warning(
                "Round %d aggregates only 2 clients: each can compute the other's "
                "update from the aggregate and its own. Sample more clients.",
                server_round,
            )
        return nodes


def _report(
    server_round: int,
    num_sampled: int,
    outcome: RoundOutcome,
    seconds: float,
    evaluation: MetricRecord | None,
) -> RoundReport:
    return RoundReport(
        server_round=server_round,
        num_sampled=num_sampled,
        num_aggregated=outcome.num_aggregated,
        num_dropped=num_sampled - outcome.num_aggregated,
        dropped_by_stage=dict(outcome.dropped_by_stage),
        seconds=seconds,
        upload_bytes=dict(outcome.upload_bytes),
        download_bytes=dict(outcome.download_bytes),
        clipped_coordinates=outcome.clipped_coordinates,
        epsilon=outcome.epsilon,
        timings=dict(outcome.timings),
        verified=outcome.verification.verified if outcome.verification else None,
        verification_reason=(
            outcome.verification.reason if outcome.verification else ""
        ),
        discarded=outcome.verification.discarded if outcome.verification else False,
        train_metrics=dict(outcome.train_metrics),
        evaluate_metrics=_metric_values(evaluation),
    )


def _metric_values(evaluation: MetricRecord | None) -> dict[str, float]:
    return {key: float(np.asarray(value)) for key, value in (evaluation or {}).items()}


def _verification_config(
    verification: VerificationConfig | bool,
    secure_aggregation: SecAggConfig | None,
    differential_privacy: DPConfig | None,
) -> VerificationConfig | None:
    if isinstance(verification, bool):
        config = VerificationConfig() if verification else None
    elif isinstance(verification, VerificationConfig):
        config = verification
    else:
        raise ValueError(
            "verification must be a bool or a VerificationConfig. "
            f"Found {type(verification).__module__}.{type(verification).__qualname__}."
        )
    if config is None:
        return None

    if differential_privacy is not None and differential_privacy.mode is DPMode.CENTRAL:
        raise ValueError(
            "verification cannot be combined with central DP: the clients would "
            "verify the aggregate before the server adds noise, so each of them "
            "would see the un-noised sum. Use mode='distributed'. Found "
            "mode='central'."
        )
    if config.pipelined and (
        secure_aggregation is None
        or secure_aggregation.key_lifetime == KEY_LIFETIME_RUN
    ):
        lifetime = secure_aggregation.key_lifetime if secure_aggregation else None
        raise ValueError(
            "pipelined verification needs secure aggregation with keys per round, "
            "whose setup and share-keys exchanges carry the previous round's "
            "commit and verify requests. Found "
            f"secure_aggregation={'None' if secure_aggregation is None else 'set'}"
            f", key_lifetime={lifetime!r}."
        )
    if secure_aggregation is not None:
        check_blinding_capacity(
            modulus=secure_aggregation.modulus,
            max_clients=secure_aggregation.max_clients,
        )
    return config
