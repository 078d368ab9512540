"""What a SuperNode's operator requires of every run, from its node config.

The run config comes from the submitter of the run, on the server side.
A client that trusted it alone would send its update in clear if the run
config set ``secure-aggregation=false``, and would add whatever DP noise the
server requested. The node config is set by the operator of the SuperNode
(``flower-supernode --node-config``), so the requirements below hold whatever
the run config and the server say:

- ``require-secure-aggregation`` (bool): always run the secure-aggregation
  mod, which never sends an update in clear.
- ``require-verification`` (bool): train only in rounds whose aggregate the
  server lets the clients verify.
- ``dp-max-epsilon`` (float): train only in rounds with distributed DP whose
  noise keeps this client's epsilon over the run within this budget. It
  implies ``require-secure-aggregation``.
- ``dp-delta`` (float, default 1e-5) and ``dp-min-honest-clients`` (int,
  default 1): the delta of that budget and the number of clients, this one
  included, whose noise the client counts on in each sum.
- ``trust-dropout-reports`` (bool, default false): trust the server's lists
  of dropped clients, to tolerate every dropout that the threshold allows
  (one of 3 clients, for example). A server that lies about dropouts can
  then unmask this node's update.

All keys are optional; a node without them follows the run config. Another
key that starts with ``require`` or ``dp`` (in any case, with ``-`` or ``_``)
or is close to a policy key, such as ``require_secure_aggregation``,
``require-secagg`` or ``dp-max-eps``, is rejected, because ignoring it would
run the node without the requirement its operator meant to set.
"""

import difflib
from collections.abc import Mapping
from dataclasses import dataclass

from fedsec_flwr import ClientPrivacyBudget

ConfigValue = bool | int | float | str

REQUIRE_SECURE_AGGREGATION = "require-secure-aggregation"
REQUIRE_VERIFICATION = "require-verification"
DP_MAX_EPSILON = "dp-max-epsilon"
DP_DELTA = "dp-delta"
DP_MIN_HONEST_CLIENTS = "dp-min-honest-clients"
TRUST_DROPOUT_REPORTS = "trust-dropout-reports"

POLICY_KEYS = (
    REQUIRE_SECURE_AGGREGATION,
    REQUIRE_VERIFICATION,
    DP_MAX_EPSILON,
    DP_DELTA,
    DP_MIN_HONEST_CLIENTS,
    TRUST_DROPOUT_REPORTS,
)

POLICY_PREFIXES = ("require", "dp-", "dp_")
"""Beginnings of keys that can only be meant as policy keys."""

MISSPELLING_CUTOFF = 0.75
"""`difflib` similarity above which an unknown key counts as a misspelled policy key."""

DEFAULT_DELTA = 1e-5


@dataclass(frozen=True)
class NodePolicy:
    """Requirements of one SuperNode's operator.

    Attributes:
        require_secure_aggregation: Run every train message through the
            secure-aggregation mod.
        require_verification: Reject rounds that the server does not verify.
        privacy_budget: The client's own DP budget, or None.
        trust_dropout_reports: Trust the server's lists of dropped clients.

    """

    require_secure_aggregation: bool = False
    require_verification: bool = False
    privacy_budget: ClientPrivacyBudget | None = None
    trust_dropout_reports: bool = False

    @property
    def private(self) -> bool:
        """Whether the operator asks that the server learn only the update.

        Such a node sends no statistic of its data in clear: no training
        loss, no stage timings and no DP-SGD epsilon, which depends on its
        number of examples.
        """
        return self.require_secure_aggregation or self.privacy_budget is not None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, ConfigValue]) -> "NodePolicy":
        """Parse the policy keys of a node config; other keys are ignored.

        Raises:
            ValueError: If a policy key has the wrong type or is out of range,
                naming the key and its value, or if another key looks like a
                misspelled policy key.
        """
        _reject_misspelled_keys(node_config)
        budget = None
        max_epsilon = _optional_number(node_config, DP_MAX_EPSILON)
        if max_epsilon is not None:
            delta = _optional_number(node_config, DP_DELTA)
            honest = _optional_int(node_config, DP_MIN_HONEST_CLIENTS)
            try:
                budget = ClientPrivacyBudget(
                    max_epsilon=max_epsilon,
                    delta=DEFAULT_DELTA if delta is None else delta,
                    min_honest_clients=1 if honest is None else honest,
                )
            except ValueError as error:
                raise ValueError(f"Invalid dp-* node config: {error}") from error
        else:
            _reject_orphans(node_config)

        # The budget is enforced by the secure-aggregation mod, so it needs it.
        return cls(
            require_secure_aggregation=_optional_bool(
                node_config, REQUIRE_SECURE_AGGREGATION
            )
            or budget is not None,
            require_verification=_optional_bool(node_config, REQUIRE_VERIFICATION),
            privacy_budget=budget,
            trust_dropout_reports=_optional_bool(node_config, TRUST_DROPOUT_REPORTS),
        )


def _reject_misspelled_keys(node_config: Mapping[str, ConfigValue]) -> None:
    for key in node_config:
        if key in POLICY_KEYS:
            continue
        normalized = key.strip().lower().replace("_", "-")
        close = difflib.get_close_matches(
            normalized, POLICY_KEYS, n=1, cutoff=MISSPELLING_CUTOFF
        )
        if close or normalized.startswith(POLICY_PREFIXES):
            meant = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"Node config key {key!r} is not a policy key.{meant} The policy "
                f"keys are {', '.join(POLICY_KEYS)}."
            )


def _reject_orphans(node_config: Mapping[str, ConfigValue]) -> None:
    for key in (DP_DELTA, DP_MIN_HONEST_CLIENTS):
        if key in node_config:
            raise ValueError(
                f"Node config key {key!r} needs {DP_MAX_EPSILON!r}, which is "
                "missing. Set the budget too, or remove the key."
            )


def _optional_bool(node_config: Mapping[str, ConfigValue], key: str) -> bool:
    value = node_config.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"Node config {key} must be true or false. Found {value!r}.")
    return value


def _optional_int(node_config: Mapping[str, ConfigValue], key: str) -> int | None:
    value = node_config.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"Node config {key} must be an integer. Found {value!r}.")
    return value


def _optional_number(node_config: Mapping[str, ConfigValue], key: str) -> float | None:
    value = node_config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"Node config {key} must be a number. Found {value!r}.")
    return float(value)
