"""The flat vector of a model: layout, commitment offsets, digest and update.

This module imports no Flower code, so the clients, the server and the
offline auditor share it:

- `FloatLayout` flattens a model's floating-point arrays into the vector
  that is encoded and summed, and adds a mean update back.
- `CommitmentLayout` maps an encoded vector to the vector a client commits
  to. Under distributed DP the noise can push a client's coordinate below
  zero, where it wraps around the modulus, and the commitment check needs
  the plain integer sum. The layout adds a public offset to the noisy slots
  so that every committed value and their sum stay in [0, modulus).
- `model_digest` hashes a model, and `next_model` computes the model that
  follows a round from the round's model and its aggregate, exactly as the
  server does.
"""

from __future__ import annotations

import hashlib
import tokenize
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from numpy.typing import NDArray

from .core.encoding import MAX_MODULUS, TRAILER_SIZE, EncodingParams, decode_sum
from .core.transcript import LongJSONInteger
from .dp.noise import distributed_noise_headroom

ARRAY_DECODE_ERRORS = (
    TypeError,
    ValueError,
    EOFError,
    OSError,
    MemoryError,
    NotImplementedError,
    RuntimeError,
    SyntaxError,
    tokenize.TokenError,
)
"""Exceptions that ``numpy.load`` raises for malformed, truncated or oversized
``.npy`` data, such as a header that declares 2**40 values."""


@dataclass(frozen=True)
class FloatLayout:
    """Layout of the aggregated arrays of a model: keys, order and shapes.

    Floating-point arrays (0-d included) are aggregated as one flat vector in
    the order of the model's keys. Other arrays, such as BatchNorm's int64
    ``num_batches_tracked``, are not aggregated: the global model keeps its
    value for them, in plain and secure mode alike.
    """

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype[np.floating], ...]

    @classmethod
    def of(cls, arrays: Mapping[str, NDArray[np.generic]]) -> FloatLayout:
        """Return the layout of the floating-point arrays of a model."""
        keys: list[str] = []
        shapes: list[tuple[int, ...]] = []
        dtypes: list[np.dtype[np.floating]] = []
        for key, array in arrays.items():
            if np.issubdtype(array.dtype, np.floating):
                keys.append(key)
                shapes.append(tuple(array.shape))
                dtypes.append(np.dtype(array.dtype.str))
        return cls(keys=tuple(keys), shapes=tuple(shapes), dtypes=tuple(dtypes))

    @property
    def size(self) -> int:
        """Number of aggregated coordinates."""
        return sum(int(np.prod(shape)) for shape in self.shapes)

    def difference(
        self,
        local: Mapping[str, NDArray[np.generic]],
        reference: Mapping[str, NDArray[np.generic]],
    ) -> NDArray[np.float64]:
        """Return ``local - reference`` over the aggregated arrays, flat, in float64."""
        result = np.empty(self.size, dtype=np.float64)
        offset = 0
        for key, shape in zip(self.keys, self.shapes, strict=True):
            size = int(np.prod(shape))
            np.subtract(
                np.ravel(local[key]),
                np.ravel(reference[key]),
                out=result[offset : offset + size],
                dtype=np.float64,
            )
            offset += size
        return result

    def apply_update(
        self,
        global_arrays: Mapping[str, NDArray[np.generic]],
        update: NDArray[np.float64],
    ) -> dict[str, NDArray[np.generic]]:
        """Add a flat update to the global model; non-float arrays stay as they are."""
        result = {
            key: np.array(value, copy=True) for key, value in global_arrays.items()
        }
        offset = 0
        for key, shape, dtype in zip(self.keys, self.shapes, self.dtypes, strict=True):
            size = int(np.prod(shape))
            chunk = update[offset : offset + size].reshape(shape)
            result[key] = (np.asarray(global_arrays[key], np.float64) + chunk).astype(
                dtype
            )
            offset += size
        return result


@dataclass(frozen=True)
class CommitmentLayout:
    """The slots of an encoded vector that carry distributed noise, and their offset.

    A client commits to its encoded vector reduced modulo the modulus, with
    `offset` added to each noisy slot. The server adds `offset` times the
    number of included clients to the same slots of the aggregate. Without
    noise the offset is 0 and both vectors are unchanged.

    Attributes:
        modulus: The encoding's modulus.
        noisy_slots: Number of leading slots with noise: the model coordinates
            under distributed DP, else 0.
        bit_slot: Index of the noisy adaptive-clipping bit, or ``None``.
        offset: The value added to each noisy slot, at least the bound on any
            one client's noise, so no committed value wraps.

    """

    modulus: int
    noisy_slots: int = 0
    bit_slot: int | None = None
    offset: int = 0

    @classmethod
    def distributed(
        cls,
        params: EncodingParams,
        *,
        num_coordinates: int,
        bit_slot: int | None,
        bit_sigma_client: float,
    ) -> CommitmentLayout:
        """Build the layout of a round with distributed DP.

        ``params.noise_headroom`` bounds the summed noise of every coordinate
        of the round's sampled clients, with a failure probability of 2**-40
        (`distributed_noise_headroom`). The same bound covers any one
        client's noise, since one client's sum is a sum of fewer terms. The
        clipping bit gets the same kind of bound, for up to
        ``params.max_clients`` clients. The offset is the larger of the two.

        Raises:
            ValueError: If max_clients * (max_weight * (levels - 1) + offset)
                + offset reaches the modulus, so committed sums could wrap.

        """
        bit_bound = 0
        if bit_slot is not None and bit_sigma_client > 0:
            bit_bound = distributed_noise_headroom(
                sigma_client=bit_sigma_client,
                num_clients=params.max_clients,
                num_coordinates=1,
            )
        offset = max(params.noise_headroom, bit_bound)
        signal = params.max_weight * (params.quantization_levels - 1)
        worst_case = params.max_clients * (signal + offset) + offset
        if worst_case >= params.modulus:
            raise ValueError(
                "Verification with distributed DP needs max_clients * "
                "(max_weight * (quantization_levels - 1) + offset) + offset below "
                f"the modulus. Found {params.max_clients} * ({signal} + {offset}) "
                f"+ {offset} = {worst_case} with modulus {params.modulus}. Lower "
                "max_clients or the quantization bits."
            )

        return cls(
            modulus=params.modulus,
            noisy_slots=num_coordinates,
            bit_slot=bit_slot,
            offset=offset,
        )

    def client_vector(self, encoded: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint32]:
        """Return the vector a client commits to for its encoded input."""
        return self._shifted(encoded, self.offset)

    def aggregate_vector(
        self, aggregate: npt.NDArray[np.uint32], *, num_included: int
    ) -> npt.NDArray[np.uint32]:
        """Return the aggregate the included clients' commitments must match."""
        return self._shifted(aggregate, self.offset * num_included)

    def included_sum(
        self, aggregate: npt.NDArray[np.uint32], *, num_included: int
    ) -> npt.NDArray[np.uint32]:
        """Undo `aggregate_vector`: return the sum of the clients' encoded inputs."""
        return self._shifted(aggregate, -self.offset * num_included)

    def _shifted(
        self, vector: npt.NDArray[np.uint32], shift: int
    ) -> npt.NDArray[np.uint32]:
        result = vector.astype(np.uint32, copy=True)
        if shift:
            # uint32 addition wraps modulo 2**32, which the mask below
            # reduces to the modulus.
            step = np.uint32(shift % self.modulus)
            result[: self.noisy_slots] += step
            if self.bit_slot is not None:
                bit = int(result[self.bit_slot]) + int(step)
                result[self.bit_slot] = bit % 2**32
        if self.modulus < 2**32:
            np.bitwise_and(result, np.uint32(self.modulus - 1), out=result)

        return result


MODEL_DIGEST_DOMAIN = b"fedsec-flwr/model-digest/v1"

_MODEL_DIGEST_CHUNK = 1 << 22


def model_digest(arrays: Mapping[str, NDArray[np.generic]]) -> bytes:
    """Compute SHA-256 of a model: names, dtypes, shapes and values, in key order.

    The key order is part of the digest, because `FloatLayout` flattens the
    arrays in that order: the same arrays in another order put each client's
    update at other coordinates of the sum. Values are hashed as
    little-endian bytes in C order, so the digest does not depend on the
    byte order or the memory layout of the arrays, and any changed value,
    even by one ulp, changes it. Numbers,
    booleans, strings, dates and durations are supported. On x86,
    ``np.longdouble`` stores 10 significant bytes in 12 or 16. Only those 10
    are hashed, because the padding is not set deterministically.

    Raises:
        ValueError: If an array's dtype has no fixed byte representation,
            such as ``object`` or a structured dtype.

    """
    digest = hashlib.sha256(MODEL_DIGEST_DOMAIN)
    digest.update(len(arrays).to_bytes(8, "little"))
    for key, value in arrays.items():
        array = np.asarray(value)
        if array.dtype.hasobject or array.dtype.kind not in _DIGEST_KINDS:
            raise ValueError(
                "model_digest needs arrays of numbers, booleans, strings, dates or "
                f"durations. Found dtype {array.dtype} for key {key!r}."
            )
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        for part in (key.encode(), little.dtype.str.encode()):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
        digest.update(little.ndim.to_bytes(8, "little"))
        for dimension in little.shape:
            digest.update(dimension.to_bytes(8, "little"))
        for chunk in _significant_bytes(little):
            digest.update(chunk.data)

    return digest.digest()


_DIGEST_KINDS = "biufcmMSU"
"""dtype kinds whose values have one byte representation."""

_X87_SIGNIFICANT_BYTES = 10
"""Bytes of an x87 extended-precision value: 64-bit significand, sign, exponent."""


def _significant_bytes(
    little: NDArray[np.generic],
) -> Iterator[NDArray[np.uint8]]:
    """Yield the value bytes of a little-endian C-ordered array in chunks."""
    flat = little.reshape(-1).view(np.uint8)
    if _is_x87_extended(little.dtype):
        width = little.dtype.itemsize // (2 if little.dtype.kind == "c" else 1)
        flat = np.ascontiguousarray(
            flat.reshape(-1, width)[:, :_X87_SIGNIFICANT_BYTES]
        ).reshape(-1)
    for start in range(0, flat.size, _MODEL_DIGEST_CHUNK):
        yield flat[start : start + _MODEL_DIGEST_CHUNK]


def _is_x87_extended(dtype: np.dtype[np.generic]) -> bool:
    """Return whether ``dtype`` is a real or complex x87 extended-precision type."""
    if dtype.kind not in "fc":
        return False
    real = np.dtype(f"f{dtype.itemsize // 2}") if dtype.kind == "c" else dtype
    if real.itemsize <= 8:
        return False
    return bool(np.finfo(real).nmant == 63)


def next_model(
    model: Mapping[str, NDArray[np.generic]],
    aggregate: npt.NDArray[np.uint32],
    *,
    params: EncodingParams,
    layout: CommitmentLayout,
    num_included: int,
) -> dict[str, NDArray[np.generic]]:
    """Return the model after a round: ``model`` plus the aggregate's decoded mean.

    ``aggregate`` is the vector the commitments sum to, with the commitment
    offset of ``num_included`` clients, which is removed before decoding.
    The blinding limbs are not part of it; any slots between the trailer
    and its end, such as the clipping bit, are extra slots.

    Raises:
        ValueError: If the aggregate is shorter than the model's vector and
            trailer or than the layout's slots, or its total weight is zero.

    """
    floats = FloatLayout.of(model)
    bit_slot = -1 if layout.bit_slot is None else layout.bit_slot
    if layout.noisy_slots > aggregate.size or bit_slot >= aggregate.size:
        raise ValueError(
            f"The commitment layout's noisy slots ({layout.noisy_slots}) and "
            f"clipping-bit slot ({layout.bit_slot}) must lie inside the "
            f"aggregate's {aggregate.size} values."
        )
    total = layout.included_sum(aggregate, num_included=num_included)
    num_extra = total.size - TRAILER_SIZE - floats.size
    if num_extra < 0:
        raise ValueError(
            f"The aggregate must have at least {floats.size + TRAILER_SIZE} values "
            f"for this model. Found {total.size}."
        )
    decoded = decode_sum(total, params=params, num_extra=num_extra)
    return floats.apply_update(model, decoded.mean)


_DECODING_INTEGERS: dict[str, tuple[int, int | None]] = {
    "quantization_levels": (2, MAX_MODULUS - 1),
    "modulus": (2, MAX_MODULUS),
    "max_weight": (1, MAX_MODULUS - 1),
    "max_clients": (1, MAX_MODULUS - 1),
    "noise_headroom": (0, MAX_MODULUS // 2 - 1),
    "noisy_slots": (0, None),
    "bit_slot": (-1, None),
    "offset": (0, None),
}
"""Integer fields of a decoding, with the smallest and largest value each accepts.

The bounds follow from `validate_capacity`, where ``max_clients * max_weight *
(quantization_levels - 1) + 2 * noise_headroom`` must stay below the
modulus. ``None`` means that the field has no bound of its own. Messages
about integer literals too long to parse name these bounds.
"""


@dataclass(frozen=True)
class ModelDecoding:
    """The public parameters that turn a round's committed aggregate into its mean.

    The server records it for each round in the audit file, so that an
    auditor with the first model can compute every later one (`next_model`).
    It contains only public parameters.

    Attributes:
        params: The round's fixed-point encoding.
        layout: The round's commitment offsets.

    """

    params: EncodingParams
    layout: CommitmentLayout

    def to_dict(self) -> dict[str, int | float]:
        """Convert to a JSON-ready dict."""
        return {
            "clip_range": self.params.clip_range,
            "quantization_levels": self.params.quantization_levels,
            "modulus": self.params.modulus,
            "max_weight": self.params.max_weight,
            "max_clients": self.params.max_clients,
            "noise_headroom": self.params.noise_headroom,
            "noisy_slots": self.layout.noisy_slots,
            "bit_slot": -1 if self.layout.bit_slot is None else self.layout.bit_slot,
            "offset": self.layout.offset,
        }

    @classmethod
    def from_dict(cls, data: object) -> ModelDecoding:
        """Parse an untrusted dict made by `to_dict`.

        Raises:
            ValueError: Naming the first field that is missing, unknown, of
                the wrong type or out of range.

        """
        if not isinstance(data, Mapping):
            raise ValueError(
                f"decoding must be an object. Found {type(data).__name__}."
            )
        expected = {"clip_range", *_DECODING_INTEGERS}
        if set(data) != expected:
            raise ValueError(
                f"decoding must have the fields {sorted(expected)}. "
                f"Found {sorted(data)}."
            )
        for name, (low, high) in _DECODING_INTEGERS.items():
            value = data[name]
            if isinstance(value, LongJSONInteger):
                raise value.range_error(f"decoding {name}", low=low, high=high)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"decoding {name} must be an int. Found {value!r}.")
        clip_range = data["clip_range"]
        if isinstance(clip_range, LongJSONInteger):
            raise clip_range.range_error("decoding clip_range", low=None, high=None)
        if isinstance(clip_range, bool) or not isinstance(clip_range, int | float):
            raise ValueError(
                f"decoding clip_range must be a number. Found {clip_range!r}."
            )
        for name in ("noisy_slots", "offset"):
            if data[name] < 0:
                raise ValueError(
                    f"decoding {name} must be at least 0. Found {data[name]}."
                )

        params = EncodingParams(
            clip_range=float(clip_range),
            quantization_levels=data["quantization_levels"],
            modulus=data["modulus"],
            max_weight=data["max_weight"],
            max_clients=data["max_clients"],
            noise_headroom=data["noise_headroom"],
        )
        bit_slot = data["bit_slot"]
        if bit_slot < -1:
            # -1 alone stands for "no bit", so that each decoding has one form.
            raise ValueError(
                f"decoding bit_slot must be -1 (no bit) or at least 0. Found "
                f"{bit_slot}."
            )
        return cls(
            params=params,
            layout=CommitmentLayout(
                modulus=params.modulus,
                noisy_slots=data["noisy_slots"],
                bit_slot=None if bit_slot < 0 else bit_slot,
                offset=data["offset"],
            ),
        )


SETTINGS_DIGEST_DOMAIN = b"fedsec-flwr/round-settings-digest/v1"

DIGEST_SIZE = 32
"""Length in bytes of a SHA-256 digest."""


def mapping_digest(mapping: Mapping[str, object]) -> bytes:
    """Compute SHA-256 of a mapping of ConfigRecord values, keys sorted.

    Every value is tagged with its type and length, so two mappings have
    one digest only if they are equal, value types included.

    Raises:
        ValueError: If a value is not a bool, int, float, str, bytes or a
            list of them, the values of a Flower ConfigRecord.

    """
    return hashlib.sha256(_canonical_mapping(mapping)).digest()


@dataclass(frozen=True)
class RoundSettings:
    """The settings every client of a round trains and encodes with, by digest.

    Each client signs `digest` with its commitment, so a client that got
    other settings than the others makes the round fail, and the decoding
    that the audit file records is the one the clients used.

    Attributes:
        config_sha256: `mapping_digest` of the training configuration as the
            clients receive it.
        fields_sha256: `mapping_digest` of the encoding and DP fields of the
            input request.
        decoding: The encoding and commitment offsets of the round.

    """

    config_sha256: bytes
    fields_sha256: bytes
    decoding: ModelDecoding

    def __post_init__(self) -> None:
        for name in ("config_sha256", "fields_sha256"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != DIGEST_SIZE:
                raise ValueError(
                    f"{name} must be {DIGEST_SIZE} bytes. Found {value!r}."
                )

    def digest(self) -> bytes:
        """Return the SHA-256 digest that the round's clients sign."""
        digest = hashlib.sha256(SETTINGS_DIGEST_DOMAIN)
        digest.update(self.config_sha256)
        digest.update(self.fields_sha256)
        digest.update(mapping_digest(self.decoding.to_dict()))
        return digest.digest()


def _canonical_mapping(mapping: Mapping[str, object]) -> bytes:
    parts = [b"d", len(mapping).to_bytes(8, "little")]
    for key in sorted(mapping):
        parts.append(_canonical_value(key))
        parts.append(_canonical_value(mapping[key]))
    return b"".join(parts)


def _canonical_value(value: object) -> bytes:
    if isinstance(value, bool):
        return b"b1" if value else b"b0"
    if isinstance(value, list):
        items = [_canonical_value(item) for item in value]
        return b"l" + len(items).to_bytes(8, "little") + b"".join(items)
    if isinstance(value, int):
        tag, text = b"i", str(int(value)).encode()
    elif isinstance(value, float):
        tag, text = b"f", float(value).hex().encode()
    elif isinstance(value, str):
        tag, text = b"s", str(value).encode()
    elif isinstance(value, bytes):
        tag, text = b"y", bytes(value)
    else:
        raise ValueError(
            "mapping_digest needs bool, int, float, str, bytes or list values. "
            f"Found {type(value).__name__}."
        )
    return tag + len(text).to_bytes(8, "little") + text
