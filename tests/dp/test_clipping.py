import numpy as np
import pytest

from fedsec_flwr.dp.clipping import clip_update_l2, l2_norm
from fedsec_flwr.dp.random import SecureRandom

FLOAT_DTYPES = [np.float16, np.float32, np.float64]


def global_norm(arrays: list[np.ndarray]) -> float:
    floats = [a.astype(np.float64).ravel() for a in arrays if a.dtype.kind == "f"]
    return float(np.sqrt(sum(np.dot(f, f) for f in floats)))


def random_update(dtype: type, *, scale: float) -> list[np.ndarray]:
    rng = SecureRandom()
    return [
        (scale * rng.normal((20, 30))).astype(dtype),
        (scale * rng.normal(50)).astype(dtype),
        np.asarray(scale * rng.normal(1)[0], dtype=dtype),
        np.array(7, dtype=np.int64),
    ]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_clipped_norm_at_most_clipping_norm(dtype: type) -> None:
    update = random_update(dtype, scale=10.0)
    clipping_norm = 1.0

    result = clip_update_l2(update, clipping_norm=clipping_norm)

    assert result.clipped
    assert global_norm(result.arrays) <= clipping_norm
    # Scaling loses at most a few units of the dtype's precision.
    assert global_norm(result.arrays) >= clipping_norm * (1 - 4 * np.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_clipping_keeps_dtypes_and_shapes(dtype: type) -> None:
    update = random_update(dtype, scale=10.0)

    result = clip_update_l2(update, clipping_norm=1.0)

    assert [a.dtype for a in result.arrays] == [a.dtype for a in update]
    assert [a.shape for a in result.arrays] == [a.shape for a in update]
    assert all(isinstance(a, np.ndarray) for a in result.arrays)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_norm_before_clipping_reported(dtype: type) -> None:
    update = random_update(dtype, scale=10.0)

    result = clip_update_l2(update, clipping_norm=1.0)

    assert result.norm == pytest.approx(global_norm(update), rel=1e-12)


def test_clipping_preserves_direction() -> None:
    update = random_update(np.float64, scale=10.0)

    result = clip_update_l2(update, clipping_norm=1.0)
    factor = result.arrays[0] / update[0]

    assert np.allclose(factor, factor.flat[0], rtol=1e-12)


def test_small_update_unchanged() -> None:
    update = random_update(np.float32, scale=0.01)

    result = clip_update_l2(update, clipping_norm=100.0)

    assert not result.clipped
    assert all(a is b for a, b in zip(result.arrays, update, strict=True))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_zero_update_not_clipped(dtype: type) -> None:
    update = [np.zeros((4, 3), dtype=dtype), np.zeros(5, dtype=np.int64)]

    result = clip_update_l2(update, clipping_norm=1.0)

    assert not result.clipped
    assert result.norm == 0.0
    assert all(np.all(a == 0) for a in result.arrays)
    assert [a.dtype for a in result.arrays] == [np.dtype(dtype), np.dtype(np.int64)]


def test_integer_arrays_untouched_when_clipping() -> None:
    counter = np.array([123456789], dtype=np.int64)
    flags = np.array([True, False])
    update = [np.full(100, 50.0, dtype=np.float32), counter, flags]

    result = clip_update_l2(update, clipping_norm=1.0)

    assert result.clipped
    assert result.arrays[1] is counter
    assert result.arrays[2] is flags


def test_integer_arrays_do_not_count_in_norm() -> None:
    update = [np.array([3.0, 4.0]), np.array([10**9], dtype=np.int64)]

    assert l2_norm(update) == 5.0


def test_float16_norm_without_overflow() -> None:
    # Squares of 60000 overflow float16, whose maximum is 65504.
    update = [np.full(1000, 60000.0, dtype=np.float16)]

    result = clip_update_l2(update, clipping_norm=1.0)

    assert np.isfinite(result.norm)
    assert result.norm == pytest.approx(60000.0 * np.sqrt(1000), rel=1e-3)
    assert global_norm(result.arrays) <= 1.0


def test_huge_float64_update_scaled_not_zeroed() -> None:
    # The squares of 1e200 overflow float64, so a plain sum of squares gives
    # an infinite norm and a factor C / inf of 0.
    update = [np.full(4, 1e200), np.array([-1e200])]

    result = clip_update_l2(update, clipping_norm=1.0)

    assert result.clipped
    assert result.norm == pytest.approx(1e200 * np.sqrt(5), rel=1e-12)
    assert result.arrays[0] == pytest.approx(np.full(4, 1 / np.sqrt(5)), rel=1e-9)
    assert result.arrays[1] == pytest.approx([-1 / np.sqrt(5)], rel=1e-9)
    assert l2_norm(result.arrays) <= 1.0


def test_tiny_update_norm_not_zero() -> None:
    # The squares of 1e-200 underflow float64 to 0.
    update = [np.full(4, 1e-200), np.array([3e-200, 0.0])]

    norm = l2_norm(update)
    result = clip_update_l2(update, clipping_norm=1e-200)

    assert norm == pytest.approx(np.sqrt(13) * 1e-200, rel=1e-12)
    assert result.clipped
    assert result.norm == norm
    assert l2_norm(result.arrays) <= 1e-200
    assert l2_norm(result.arrays) == pytest.approx(1e-200, rel=1e-9)


def test_norm_beyond_float64_rejected() -> None:
    update = [np.full(2, np.finfo(np.float64).max)]

    with pytest.raises(ValueError, match=r"exceed the float64 range.*Found norm inf"):
        clip_update_l2(update, clipping_norm=1.0)


def test_zero_dimensional_arrays() -> None:
    update = [np.array(3.0), np.array(4.0, dtype=np.float32)]

    result = clip_update_l2(update, clipping_norm=1.0)

    assert result.arrays[0].shape == ()
    assert result.arrays[1].dtype == np.float32
    assert global_norm(result.arrays) <= 1.0


def test_empty_update() -> None:
    result = clip_update_l2([], clipping_norm=1.0)

    assert result.arrays == []
    assert not result.clipped


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_value_names_array_index(bad: float) -> None:
    update = [np.zeros(3), np.array([1.0, bad])]

    with pytest.raises(ValueError, match=r"update\[1\] must contain only finite"):
        clip_update_l2(update, clipping_norm=1.0)


def test_complex_array_rejected() -> None:
    update = [np.zeros(3, dtype=np.complex128)]

    with pytest.raises(ValueError, match=r"update\[0\] must have a real float"):
        clip_update_l2(update, clipping_norm=1.0)


@pytest.mark.parametrize("clipping_norm", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_clipping_norm(clipping_norm: float) -> None:
    with pytest.raises(
        ValueError, match=r"clipping_norm must be finite and positive\. Found"
    ):
        clip_update_l2([np.ones(3)], clipping_norm=clipping_norm)
