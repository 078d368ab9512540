import math
import sys

import numpy as np

from fedsec_flwr.core.bounds import lower_bound_text, upper_bound_text

# Bounds of this package that were quoted rounded the wrong way, and values
# at the ends of float64.
EDGE_VALUES = [
    2.0**-400,
    2.0**-60,
    2.0**-991,
    sys.float_info.max / 16,
    3.4028234663852886e38,
    sys.float_info.max,
    5e-324,
    1.0,
    9.9995,
    0.1,
]


def _random_values(count: int) -> list[float]:
    rng = np.random.default_rng(20261206)
    exponents = rng.uniform(-300, 300, size=count)
    mantissas = rng.uniform(1.0, 10.0, size=count)
    return [float(m * 10.0**e) for m, e in zip(mantissas, exponents, strict=True)]


def test_quoted_bounds_are_accepted() -> None:
    for value in EDGE_VALUES + _random_values(2000):
        lower = float(lower_bound_text(value))
        upper = float(upper_bound_text(value))

        assert lower >= value, value
        assert upper <= value, value
        assert math.isclose(lower, value, rel_tol=1e-3), value
        assert math.isclose(upper, value, rel_tol=1e-3), value


def test_bound_text_digits() -> None:
    assert lower_bound_text(2.0**-60) == "8.674e-19"
    assert upper_bound_text(3.4028234663852886e38) == "3.402e+38"
    assert lower_bound_text(1.0) == "1"
    assert upper_bound_text(0.0) == "0.0"
    assert lower_bound_text(sys.float_info.max) == "1.7976931348623157e+308"
