"""Every bound that an error message quotes is itself accepted.

Each case provokes the error, reads the number after "at least" or "at
most" in the message, and passes that number back to the same check.
"""

import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from fedsec_flwr.core.encoding import EncodingParams
from fedsec_flwr.dp.dpsgd import DPSGDConfig
from fedsec_flwr.dp.random import SecureRandom
from fedsec_flwr.privacy import DPConfig, DPMode

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "secure_fedavg"
sys.path.insert(0, str(APP_DIR))

from tests.test_app_settings import parse  # noqa: E402

BOUND = re.compile(r"(?:at least|at most) ([0-9.]+(?:e[+-][0-9]+)?)")


def _central(**changes: float) -> DPConfig:
    return DPConfig(
        **(
            {"mode": DPMode.CENTRAL, "clipping_norm": 1.0, "noise_multiplier": 1.0}
            | changes
        )  # type: ignore[arg-type]
    )


def _encoding(clip_range: float) -> EncodingParams:
    return EncodingParams(
        clip_range=clip_range,
        quantization_levels=2**16,
        modulus=2**32,
        max_weight=1,
        max_clients=10,
    )


def _dp_sgd(max_grad_norm: float) -> DPSGDConfig:
    return DPSGDConfig(delta=1e-5, noise_multiplier=1.0, max_grad_norm=max_grad_norm)


def _app(key: str, **fixed: object) -> Callable[[float], object]:
    return lambda value: parse(**fixed, **{key: value})


CASES: list[tuple[str, Callable[[float], object], float]] = [
    ("clipping_norm floor", lambda v: _central(clipping_norm=v), 1e-130),
    ("noise std ceiling", lambda v: _central(clipping_norm=v), 1e38),
    (
        "clipping_norm ceiling with a target",
        lambda v: DPConfig(mode=DPMode.CENTRAL, clipping_norm=v, target_epsilon=1.0),
        1e36,
    ),
    ("max_grad_norm floor", _dp_sgd, 1e-40),
    ("max_grad_norm ceiling", _dp_sgd, 1e300),
    ("normal std ceiling", lambda v: SecureRandom().normal(1, std=v), 1e308),
    ("clip_range floor", _encoding, 1e-300),
    ("secagg-clip-range ceiling", _app("secagg_clip_range"), 3e38),
    (
        "dp-sgd-max-grad-norm floor",
        _app("dp_sgd_max_grad_norm", dp_sgd=True, dp_sgd_noise_multiplier=1.0),
        1e-40,
    ),
    ("float32 ceiling", _app("server_learning_rate"), 1e39),
]


@pytest.mark.parametrize(
    ("check", "invalid"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_quoted_bound_accepted(
    check: Callable[[float], object], invalid: float
) -> None:
    with pytest.raises(ValueError) as raised:
        check(invalid)
    found = BOUND.search(str(raised.value))
    assert found is not None, str(raised.value)

    check(float(found.group(1)))
