"""The app's run config is checked when it is parsed, before any round starts."""

import dataclasses
import math
import re
import sys
import tomllib
from pathlib import Path

import pytest

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "secure_fedavg"
sys.path.insert(0, str(APP_DIR))

from secure_fedavg_app.settings import MAX_CONFIG_INT, AppSettings  # noqa: E402


def default_config() -> dict[str, object]:
    with (APP_DIR / "pyproject.toml").open("rb") as file:
        project = tomllib.load(file)
    return dict(project["tool"]["flwr"]["app"]["config"])


def parse(**changes: object) -> AppSettings:
    config = default_config()
    config.update({key.replace("_", "-"): value for key, value in changes.items()})
    return AppSettings.from_run_config(config)  # type: ignore[arg-type]


def test_defaults_parse() -> None:
    settings = parse()

    assert settings.dp_mode == "off"
    assert settings.verification is False


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"noise_multiplier": 1.0}, "dp-mode is off, so noise-multiplier=1.0"),
        ({"target_epsilon": 3.0}, "dp-mode is off, so target-epsilon=3.0"),
        ({"adaptive_clipping": True}, "dp-mode is off, so adaptive-clipping=true"),
        ({"dp_sgd_target_epsilon": 3.0}, "dp-sgd is false, so dp-sgd-noise"),
        ({"dp_sgd_noise_multiplier": 1.0}, "dp-sgd is false, so dp-sgd-noise"),
        ({"verification_pipelined": True}, "verification-pipelined=true needs"),
    ],
)
def test_settings_switched_off_rejected(
    changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        parse(**changes)


@pytest.mark.parametrize(
    "key",
    ["dirichlet_alpha", "dp_sgd_noise_multiplier", "dp_sgd_max_grad_norm", "delta"],
)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_numbers_rejected(key: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"{key.replace('_', '-')} must be a finite"):
        parse(**{key: value})


@pytest.mark.parametrize(
    "key", ["num_server_rounds", "local_epochs", "batch_size", "seed"]
)
@pytest.mark.parametrize("value", [2**63, 10**30, MAX_CONFIG_INT + 1])
def test_huge_integers_rejected(key: str, value: int) -> None:
    with pytest.raises(ValueError, match=f"at most {MAX_CONFIG_INT} in magnitude"):
        parse(**{key: value})


@pytest.mark.parametrize("delta", [1.0, 0.5, 0.1])
def test_delta_of_a_tenth_or_more_rejected(delta: float) -> None:
    # A mechanism that publishes each record with probability delta meets
    # (0, delta)-DP, so such a delta protects nothing worth reporting.
    with pytest.raises(
        ValueError, match=rf"delta must be in \[1e-15, 0.1\): .* Found {delta}"
    ):
        parse(dp_sgd=True, dp_sgd_noise_multiplier=1.0, delta=delta)


@pytest.mark.parametrize("value", [-1, 65_537])
def test_hidden_units_out_of_range_rejected(value: int) -> None:
    message = rf"hidden-units must be 0 \(the dataset's default\) .*found {value}\."

    with pytest.raises(ValueError, match=message):
        parse(hidden_units=value)


def test_hidden_units_parsed() -> None:
    assert parse().hidden_units == 0
    assert parse(hidden_units=65_536).hidden_units == 65_536


@pytest.mark.parametrize("delta", [5e-324, 1e-300, 9e-16])
@pytest.mark.parametrize(
    "changes",
    [
        {"dp_sgd": True, "dp_sgd_noise_multiplier": 1.0},
        {"dp_mode": "central", "noise_multiplier": 1.0, "dp_accountant": "prv"},
    ],
)
def test_delta_below_minimum_rejected(delta: float, changes: dict[str, object]) -> None:
    with pytest.raises(
        ValueError, match=rf"delta must be in \[1e-15, 0.1\): .* Found {delta}"
    ):
        parse(delta=delta, **changes)


@pytest.mark.parametrize("value", [1e300, 1.8e38])
def test_huge_clip_range_rejected(value: float) -> None:
    message = rf"secagg-clip-range must be at most 1\.701e\+38, .*found {re.escape(str(value))}\."

    with pytest.raises(ValueError, match=message):
        parse(secagg_clip_range=value)


def test_blank_output_dir_rejected() -> None:
    with pytest.raises(ValueError, match="output-dir must not be empty or blank"):
        parse(output_dir="  ")


def test_pipelined_verification_with_verification_accepted() -> None:
    settings = parse(verification=True, verification_pipelined=True)

    assert settings.verification_pipelined is True


@pytest.mark.parametrize(
    "changes",
    [
        {"dp_mode": "central", "target_epsilon": 3.0},
        {"dp_mode": "distributed", "noise_multiplier": 1.0},
        {},
    ],
)
def test_dropout_fraction_outside_distributed_target_mode_rejected(
    changes: dict[str, object],
) -> None:
    with pytest.raises(
        ValueError,
        match=r"dp-max-dropout-fraction=0\.3 applies only to dp-mode=distributed "
        r"with target-epsilon above 0",
    ):
        parse(dp_max_dropout_fraction=0.3, **changes)


@pytest.mark.parametrize("value", [1.0, -0.1, 2.5])
def test_dropout_fraction_out_of_range_rejected(value: float) -> None:
    with pytest.raises(
        ValueError, match=rf"dp-max-dropout-fraction must be in \[0, 1\); found {value}"
    ):
        parse(dp_mode="distributed", target_epsilon=3.0, dp_max_dropout_fraction=value)


def test_dropout_fraction_reaches_the_dp_config() -> None:
    from secure_fedavg_app.strategy_factory import build_dp_config

    settings = parse(
        dp_mode="distributed", target_epsilon=3.0, dp_max_dropout_fraction=0.3
    )

    config = build_dp_config(settings)

    assert config is not None
    assert config.max_dropout_fraction == 0.3


@pytest.mark.parametrize("value", [1e-300, 16384.5, 1e300])
@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"dp_mode": "central"}, "noise-multiplier"),
        ({"dp_sgd": True}, "dp-sgd-noise-multiplier"),
    ],
)
def test_noise_multiplier_out_of_range_rejected(
    changes: dict[str, object], key: str, value: float
) -> None:
    # DP-SGD clients would reject the value only once the run has started.
    with pytest.raises(
        ValueError,
        match=rf"{key} must be 0 or in \[0\.0009765625, 16384\] \(2\*\*-10 to "
        rf"2\*\*14\); found {re.escape(str(value))}",
    ):
        parse(**changes, **{key.replace("-", "_"): value})
        parse(**changes)


@pytest.mark.parametrize(
    ("changes", "message", "absent"),
    [
        ({"dp_mode": ""}, "dp-mode must be one of", "With dp-mode on"),
        ({"dp_mode": "bogus"}, "dp-mode must be one of", "With dp-mode on"),
        (
            {"dp_mode": "central", "noise_multiplier": -1.0},
            "noise-multiplier must be at least 0; found -1.0",
            "must be 0 or in",
        ),
    ],
)
def test_one_invalid_value_gets_one_message(
    changes: dict[str, object], message: str, absent: str
) -> None:
    with pytest.raises(ValueError, match=message) as error:
        parse(**changes)

    assert absent not in str(error.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"clipping_norm": 2.0}, "dp-mode is off, so clipping-norm=2.0"),
        ({"dp_accountant": "prv"}, "dp-mode is off, so dp-accountant=prv"),
        (
            {"dp_mode": "central", "noise_multiplier": 1.0, "clipping_quantile": 0.9},
            "adaptive-clipping is false, so clipping-quantile=0.9",
        ),
        ({"dp_sgd_max_grad_norm": 3.0}, "dp-sgd is false, so dp-sgd-max-grad-norm"),
        ({"verification_policy": "report"}, "verification is false, so verif"),
        ({"dirichlet_alpha": 0.1}, "partitioning is iid, so dirichlet-alpha=0.1"),
        (
            {"secure_aggregation": False, "secagg_max_weight": 200},
            "secure-aggregation and verification are false, so secagg-max-weight",
        ),
        (
            {"secure_aggregation": False, "secagg_key_lifetime": "run"},
            "secure-aggregation and verification are false, so secagg-key-lifetime",
        ),
        (
            {"secure_aggregation": False, "verification": True, "secagg_timeout": 9.0},
            "secure-aggregation is false, so secagg-timeout=9.0",
        ),
        (
            {"secure_aggregation": False, "verification": True, "secagg_threshold": 3},
            "secure-aggregation is false, so secagg-threshold=3",
        ),
        (
            {"dp_mode": "central", "noise_multiplier": 1.0, "secagg_clip_range": 5.0},
            "dp-mode is central, whose encoding .* so secagg-clip-range=5.0",
        ),
        (
            {"dp_mode": "distributed", "noise_multiplier": 1.0, "secagg_max_weight": 7},
            "dp-mode is distributed, whose encoding .* so secagg-max-weight=7",
        ),
        ({"delta": 0.01}, "dp-mode is off and dp-sgd is false, so delta=0.01"),
    ],
)
def test_changed_setting_that_is_switched_off_rejected(
    changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        parse(**changes)


@pytest.mark.parametrize(
    "changes",
    [
        {"partitioning": "dirichlet", "dirichlet_alpha": 0.1},
        # A plain verified round encodes updates with these settings.
        {"secure_aggregation": False, "verification": True, "secagg_max_weight": 200},
        {"secure_aggregation": False, "verification": True, "secagg_clip_range": 2.0},
        {"secure_aggregation": False, "verification": True, "secagg_max_clients": 9},
        {"dp_sgd": True, "dp_sgd_noise_multiplier": 1.0, "delta": 1e-6},
        {"dp_mode": "central", "noise_multiplier": 1.0, "secagg_max_clients": 9},
    ],
)
def test_setting_in_use_accepted(changes: dict[str, object]) -> None:
    settings = parse(**changes)

    for key, value in changes.items():
        assert getattr(settings, key) == value


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {
                "dp_mode": "distributed",
                "noise_multiplier": 1.0,
                "secure_aggregation": False,
            },
            "dp-mode=distributed needs secure-aggregation=true",
        ),
        (
            {"dp_mode": "central", "noise_multiplier": 1.0, "verification": True},
            "verification=true cannot be combined with dp-mode=central",
        ),
        (
            {
                "verification": True,
                "verification_pipelined": True,
                "secagg_key_lifetime": "run",
            },
            'found secure-aggregation=true and secagg-key-lifetime="run"',
        ),
        (
            {
                "verification": True,
                "verification_pipelined": True,
                "secure_aggregation": False,
            },
            "verification-pipelined=true needs secure-aggregation=true",
        ),
        (
            {"min_train_clients": 200},
            "min-train-clients=200 is above secagg-max-clients=100",
        ),
        (
            {"verification": True, "server_momentum": 0.9},
            "server-learning-rate and server-momentum cannot be changed with "
            "verification=true.*Found server-learning-rate=1.0 and "
            "server-momentum=0.9",
        ),
        (
            {"verification": True, "server_learning_rate": 0.5},
            "Found server-learning-rate=0.5 and server-momentum=0.0",
        ),
    ],
)
def test_protocol_combination_names_keys(
    changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        parse(**changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"server_learning_rate": 0.0}, "server-learning-rate must be positive"),
        ({"server_learning_rate": -1.0}, "server-learning-rate must be positive"),
        ({"server_momentum": 1.0}, r"server-momentum must be in \[0, 1\); found 1.0"),
        ({"server_momentum": -0.5}, r"server-momentum must be in \[0, 1\)"),
        ({"server_momentum": "0.9"}, "server-momentum"),
        ({"server_momentum": math.nan}, "server-momentum must be a finite"),
    ],
)
def test_server_momentum_keys_checked(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse(**changes)


@pytest.mark.parametrize("rate", [0.0, 10.5, 1e300])
def test_clipping_learning_rate_bounded_before_the_run(rate: float) -> None:
    # The adaptive clipping norm changes by up to exp(rate) per round, and
    # 1e300 used to pass the check and overflow after round 1.
    with pytest.raises(
        ValueError,
        match=rf"clipping-learning-rate must be in \(0, 10\]: .*; found "
        rf"{re.escape(str(rate))}",
    ):
        parse(
            dp_mode="central",
            noise_multiplier=1.0,
            adaptive_clipping=True,
            clipping_learning_rate=rate,
        )


def test_huge_clipping_norm_with_target_rejected(
    tmp_path: Path,
) -> None:
    from secure_fedavg_app.strategy_factory import build_strategy

    settings = parse(dp_mode="central", target_epsilon=8.0, clipping_norm=1e300)

    with pytest.raises(
        ValueError, match=r"clipping-norm must be at most .* Found 1e\+300"
    ):
        build_strategy(settings, lambda report: None, audit_path=tmp_path / "a")


@pytest.mark.parametrize("dp_mode", ["central", "distributed"])
def test_tiny_clipping_norm_rejected_at_launch(dp_mode: str) -> None:
    from secure_fedavg_app.server_app import check_run_config

    config = default_config()
    config.update(
        {"dp-mode": dp_mode, "noise-multiplier": 1.0, "clipping-norm": 5e-324}
    )

    with pytest.raises(
        ValueError,
        match=r"^Invalid DP run config: clipping-norm must be at least 3\.873e-121 "
        r"\(2\*\*-400\), .* Found 5e-324\.$",
    ):
        check_run_config(config)


def test_server_learning_rate_bounded_by_float32() -> None:
    with pytest.raises(
        ValueError, match=r"server-learning-rate must be at most 3\.402e"
    ):
        parse(server_learning_rate=1e39)


def test_server_momentum_keys_reach_the_strategy(tmp_path: Path) -> None:
    from secure_fedavg_app.strategy_factory import build_strategy

    default = build_strategy(parse(), lambda report: None, audit_path=tmp_path / "a")
    changed = build_strategy(
        parse(server_learning_rate=0.5, server_momentum=0.9),
        lambda report: None,
        audit_path=tmp_path / "a",
    )

    assert default.server_momentum is None
    assert changed.server_momentum is not None
    assert changed.server_momentum.learning_rate == 0.5
    assert changed.server_momentum.momentum == 0.9


def test_dataclass_defaults_match_app_config() -> None:
    # A setting counts as changed when it differs from its dataclass default,
    # so those defaults must be the app's.
    parsed = parse()
    defaults = AppSettings.__dataclass_fields__

    for name, field in defaults.items():
        if field.default is not dataclasses.MISSING:
            assert getattr(parsed, name) == field.default, name


def test_quantile_of_one_rejected_with_key() -> None:
    with pytest.raises(ValueError, match=r"clipping-quantile must be in \(0, 1\)"):
        parse(dp_mode="central", noise_multiplier=1.0, clipping_quantile=1.0)


def test_dotted_parameter_named_as_one_key() -> None:
    from secure_fedavg_app.strategy_factory import name_run_config_keys

    message = name_run_config_keys(
        "min_train_nodes must not exceed secure_aggregation.max_clients 100"
    )

    assert message == (
        "min-train-clients (min_train_nodes) must not exceed secagg-max-clients "
        "(secure_aggregation.max_clients) 100"
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"min_train_clients": 1}, "min-train-clients .min_train_nodes. must be"),
        (
            {"dp_mode": "central", "noise_multiplier": 1e4, "clipping_norm": 1e35},
            r"noise-multiplier \* clipping-norm",
        ),
    ],
)
def test_strategy_errors_name_run_config_keys(
    changes: dict[str, object], message: str, tmp_path: Path
) -> None:
    from secure_fedavg_app.strategy_factory import build_strategy

    settings = parse(**changes)

    with pytest.raises(ValueError, match=message):
        build_strategy(settings, lambda report: None, audit_path=tmp_path / "a.json")


def test_prv_accountant_over_many_rounds_rejected() -> None:
    with pytest.raises(ValueError, match="dp-accountant=prv composes at most 1000"):
        parse(
            dp_mode="central",
            target_epsilon=1.0,
            dp_accountant="prv",
            num_server_rounds=100_000,
        )


def test_round_one_errors_name_run_config_keys(tmp_path: Path) -> None:
    # The Poisson sample-size check needs the connected nodes, so it runs
    # in round 1, after the settings were parsed.
    from secure_fedavg_app.client_app import app as client_app
    from secure_fedavg_app.results import ResultsFile
    from secure_fedavg_app.server_app import _run

    from tests.loopback import LoopbackGrid

    config = default_config()
    config.update({"client-sampling": "poisson", "fraction-train": 0.5})
    grid = LoopbackGrid(client_app, [1, 2, 3], run_config=config)
    results = ResultsFile(tmp_path, run_config=config, run_info={})

    with pytest.raises(ValueError, match=r"fraction-train 0.5 over 3"):
        _run(grid, config, results)


def test_round_one_distributed_target_error_keys(
    tmp_path: Path,
) -> None:
    # Without the launcher's node count, the target is calibrated in round 1.
    from secure_fedavg_app.client_app import app as client_app
    from secure_fedavg_app.results import ResultsFile
    from secure_fedavg_app.server_app import _run

    from tests.loopback import LoopbackGrid

    config = default_config()
    config.update({"dp-mode": "distributed", "target-epsilon": 0.01})
    grid = LoopbackGrid(client_app, [1, 2, 3], run_config=config)
    results = ResultsFile(tmp_path, run_config=config, run_info={})

    with pytest.raises(
        ValueError,
        match=r"^target-epsilon 0\.01 is below 0\.01949, the smallest epsilon",
    ):
        _run(grid, config, results)


def test_earlier_audit_file_refused_before_round_one(tmp_path: Path) -> None:
    from secure_fedavg_app.client_app import app as client_app
    from secure_fedavg_app.results import ResultsFile
    from secure_fedavg_app.server_app import _run, check_run_config

    from tests.loopback import LoopbackGrid

    earlier = tmp_path / "audit.json"
    earlier.write_text("{}")
    (tmp_path / "final_model.npz").write_bytes(b"earlier model")
    config = default_config()
    config.update({"verification": True, "output-dir": str(tmp_path)})
    grid = LoopbackGrid(client_app, [1, 2, 3], run_config=config)
    results = ResultsFile(tmp_path, run_config=config, run_info={})
    pattern = r"contains an earlier run's audit\.json\. A new run would add"

    with pytest.raises(ValueError, match=pattern):
        check_run_config(config)
    with pytest.raises(ValueError, match=pattern):
        _run(grid, config, results)
    assert earlier.read_text() == "{}"
    assert (tmp_path / "final_model.npz").read_bytes() == b"earlier model"
    assert not (tmp_path / "initial_model.npz").exists()


def test_model_file_link_replaced_not_followed(tmp_path: Path) -> None:
    import numpy as np
    from flwr.app import Array, ArrayRecord
    from secure_fedavg_app.server_app import _save_model

    target = tmp_path / "elsewhere.txt"
    target.write_text("keep")
    link = tmp_path / "final_model.npz"
    link.symlink_to(target)

    _save_model(ArrayRecord({"w": Array(np.arange(3.0))}), link)

    assert target.read_text() == "keep"
    assert not link.is_symlink()
    assert np.array_equal(np.load(link)["w"], np.arange(3.0))


def test_type_errors_listed_together() -> None:
    with pytest.raises(ValueError) as caught:
        parse(seed=1.5, learning_rate="fast", secure_aggregation="yes")

    message = str(caught.value)
    assert "seed must be an integer. Found 1.5." in message
    assert "learning-rate must be a number. Found 'fast'." in message
    assert "secure-aggregation must be true or false. Found 'yes'." in message


def test_learning_rate_above_float32_rejected() -> None:
    with pytest.raises(ValueError, match=r"learning-rate must be at most 3.402e\+38"):
        parse(learning_rate=1e308)


@pytest.mark.parametrize(
    "changes",
    [
        {"dp_mode": "central", "noise_multiplier": 1.0},
        {"dp_sgd": True, "dp_sgd_noise_multiplier": 1.0},
    ],
    ids=["client-level", "dp-sgd"],
)
def test_client_timings_under_dp_rejected(changes: dict[str, object]) -> None:
    with pytest.raises(
        ValueError, match=r"client-timings=true is not allowed while DP is on"
    ) as caught:
        parse(client_timings=True, **changes)

    assert "would have no effect" not in str(caught.value)


def test_huge_integer_for_number_listed() -> None:
    with pytest.raises(ValueError, match="learning-rate must be a finite number"):
        parse(learning_rate=10**400)


def test_client_timings_without_protocol_rejected() -> None:
    with pytest.raises(
        ValueError, match="only their protocols report client timings, so client-"
    ):
        parse(secure_aggregation=False, client_timings=True)

    assert parse(client_timings=True).client_timings is True
    assert parse(
        secure_aggregation=False, verification=True, client_timings=True
    ).client_timings


def test_launch_check_accepts_defaults_and_writes_nothing(tmp_path: Path) -> None:
    from secure_fedavg_app.server_app import check_run_config

    config = default_config()
    config.update(
        {"output-dir": str(tmp_path / "out"), "verification": True, "dp-mode": "off"}
    )

    check_run_config(config)

    assert not (tmp_path / "out").exists()


def test_launch_check_rejects_what_only_the_strategy_checks() -> None:
    # Each range is valid on its own; SecureFedAvg rejects the combination.
    from secure_fedavg_app.server_app import check_run_config

    config = default_config()
    config.update({"min-train-clients": 5, "secagg-max-clients": 2})

    with pytest.raises(ValueError, match=r"min-train-clients=5 is above"):
        check_run_config(config)


def test_launch_check_restores_the_package_log_level() -> None:
    import logging

    from secure_fedavg_app.server_app import PACKAGE_LOGGER_NAME, check_run_config

    package_logger = logging.getLogger(PACKAGE_LOGGER_NAME)
    before = package_logger.level
    config = default_config()
    config["secagg-max-clients"] = 1

    with pytest.raises(ValueError):
        check_run_config(config)

    assert package_logger.level == before


def test_strategy_warnings_name_run_config_keys(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    from secure_fedavg_app.server_app import STRATEGY_LOGGER_NAME, _run_config_names_in

    strategy_logger = logging.getLogger(STRATEGY_LOGGER_NAME)
    text = "Round %d: Poisson sampling with fraction_train %s over %d nodes"

    with caplog.at_level(logging.WARNING, logger=STRATEGY_LOGGER_NAME):
        with _run_config_names_in(strategy_logger):
            strategy_logger.warning(text, 3, 0.5, 7)
        strategy_logger.warning(text, 4, 0.5, 7)

    assert caplog.messages == [
        "Round 3: Poisson sampling with fraction-train 0.5 over 7 nodes",
        "Round 4: Poisson sampling with fraction_train 0.5 over 7 nodes",
    ]


@pytest.mark.parametrize("value", [0.0, -1.0, 1e-40])
def test_tiny_dp_sgd_grad_norm_rejected(value: float) -> None:
    with pytest.raises(
        ValueError,
        match=rf"dp-sgd-max-grad-norm must be at least 8\.674e-19 \(2\*\*-60\); "
        rf"found {value}",
    ):
        parse(dp_sgd=True, dp_sgd_noise_multiplier=1.0, dp_sgd_max_grad_norm=value)


def test_huge_dp_sgd_grad_norm_rejected() -> None:
    with pytest.raises(
        ValueError, match=r"dp-sgd-max-grad-norm must be at most 3.402e\+38"
    ):
        parse(dp_sgd=True, dp_sgd_noise_multiplier=1.0, dp_sgd_max_grad_norm=1e308)


def test_unused_bool_written_as_in_run_config() -> None:
    with pytest.raises(ValueError, match=r"client-timings=true would have no effect"):
        parse(secure_aggregation=False, client_timings=True)


def test_launch_check_rejects_unreachable_central_target() -> None:
    from secure_fedavg_app.server_app import check_run_config

    config = default_config()
    config.update(
        {"dp-mode": "central", "target-epsilon": 0.01, "num-server-rounds": 1}
    )

    with pytest.raises(
        ValueError,
        match=r"^Invalid run config: target-epsilon 0\.01 is below 0\.01949, the "
        r"smallest epsilon the RDP accountant reports at delta 1e-05 with any "
        r'noise\. Raise target-epsilon or delta, or set dp-accountant="prv"\.$',
    ):
        check_run_config(config)


def test_launch_check_distributed_target_with_nodes() -> None:
    from secure_fedavg_app.server_app import check_run_config

    config = default_config()
    config.update(
        {
            "dp-mode": "distributed",
            "target-epsilon": 0.025,
            "num-server-rounds": 2,
            "verification": True,
        }
    )

    # Its noise depends on the round's clients, known only with the nodes.
    check_run_config(config)
    with pytest.raises(
        ValueError,
        match=r"^Invalid run config for 4 simulated SuperNodes \(--num-supernodes\): "
        r"target-epsilon 0\.025 with delta 1e-05 over num-server-rounds 2 cannot be "
        r"met in distributed mode: every noise multiplier whose noise fits the "
        r"secure sum gives a larger epsilon\. Raise target-epsilon or delta, lower "
        r"num-server-rounds, lower secagg-max-clients, or set verification=false",
    ):
        check_run_config(config, num_nodes=4)
    config["target-epsilon"] = 3.0
    check_run_config(config, num_nodes=4)


def test_launch_check_names_only_useful_changes() -> None:
    # The search limit, not the modulus, stops this one, so the number of
    # clients is not named.
    from secure_fedavg_app.server_app import check_run_config

    config = default_config()
    config.update(
        {"dp-mode": "distributed", "target-epsilon": 0.03, "num-server-rounds": 200}
    )

    with pytest.raises(ValueError) as caught:
        check_run_config(config, num_nodes=4)

    message = str(caught.value)
    assert "needs a noise multiplier above 1000, which still gives epsilon" in message
    assert message.endswith(
        "Raise target-epsilon or delta, or lower num-server-rounds."
    )


def test_launch_check_fixed_noise_must_fit() -> None:
    from secure_fedavg_app.server_app import check_run_config

    config = default_config()
    config.update(
        {
            "dp-mode": "distributed",
            "noise-multiplier": 800.0,
            "num-server-rounds": 1,
            "verification": True,
        }
    )

    check_run_config(config)
    with pytest.raises(
        ValueError,
        match=r"^Invalid run config for 4 simulated SuperNodes \(--num-supernodes\): "
        r"noise-multiplier 800\.0 adds more noise than the secure sum of "
        r"dp-mode=distributed leaves room for\. Lower noise-multiplier to at most "
        r"155, lower secagg-max-clients, or set verification=false to leave the "
        r"noise more room\.$",
    ):
        check_run_config(config, num_nodes=4)
    config["noise-multiplier"] = 155.0
    check_run_config(config, num_nodes=4)


def test_launch_check_fixed_noise_names_only_keys() -> None:
    # The library's message advises max_weight, the quantization bits and
    # the modulus, which a DP run of the app cannot set.
    from secure_fedavg_app.server_app import check_run_config

    config = default_config()
    config.update(
        {"dp-mode": "distributed", "noise-multiplier": 8000.0, "num-server-rounds": 1}
    )

    with pytest.raises(ValueError) as caught:
        check_run_config(config, num_nodes=4)

    message = str(caught.value)
    assert message.endswith(
        "noise-multiplier 8000.0 adds more noise than the secure sum of "
        "dp-mode=distributed leaves room for. Lower noise-multiplier to at most "
        "7850, or lower secagg-max-clients to leave the noise more room."
    )
    for library_name in ("max_weight", "max-weight", "quantization", "modulus"):
        assert library_name not in message


def test_round_one_fixed_noise_error_keys(tmp_path: Path) -> None:
    # Without the launcher's node count, the noise is checked in round 1.
    from secure_fedavg_app.client_app import app as client_app
    from secure_fedavg_app.results import ResultsFile
    from secure_fedavg_app.server_app import _run

    from tests.loopback import LoopbackGrid

    config = default_config()
    config.update(
        {"dp-mode": "distributed", "noise-multiplier": 8000.0, "num-server-rounds": 1}
    )
    grid = LoopbackGrid(client_app, [1, 2, 3], run_config=config)
    results = ResultsFile(tmp_path, run_config=config, run_info={})

    with pytest.raises(
        ValueError,
        match=r"^noise-multiplier 8000\.0 adds more noise than the secure sum of "
        r"dp-mode=distributed leaves room for\. Lower noise-multiplier to at most "
        r"\d+, or lower secagg-max-clients to leave the noise more room\.$",
    ):
        _run(grid, config, results)


def test_launch_check_nodes_before_target() -> None:
    from secure_fedavg_app.server_app import check_run_config

    config = default_config()
    config.update(
        {"dp-mode": "distributed", "target-epsilon": 0.01, "min-train-clients": 5}
    )

    with pytest.raises(ValueError, match=r"5 is above the 4 nodes"):
        check_run_config(config, num_nodes=4)
