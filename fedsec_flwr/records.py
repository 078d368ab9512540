"""Record names and conversions between protocol messages and Flower records."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from numpy.typing import NDArray

from .core.encoding import EncodingParams
from .core.errors import ProtocolError
from .core.messages import Fields, _field
from .models import ARRAY_DECODE_ERRORS

PROTOCOL_RECORD = "fedsec.secagg"
"""ConfigRecord with the protocol stage and the request or reply fields."""

DEFERRED_RECORD = "fedsec.secagg.deferred"
"""ConfigRecord with a commit or verify stage of an earlier round, carried by
a request or reply of the next round's exchange."""

STATE_RECORD = "fedsec.secagg.state"
"""ConfigRecord in ``Context.state`` with the client's protocol state."""

RUN_KEYS_RECORD = "fedsec.secagg.run-keys"
"""ConfigRecord in ``Context.state`` with the client's private keys of the run."""

PRIVACY_BUDGET_RECORD = "fedsec.privacy-budget"
"""ConfigRecord in ``Context.state`` with the noise of each round the client
contributed to, for its own privacy budget."""

MASKED_INPUT_RECORD = "fedsec.masked-input"
"""ArrayRecord with the client's masked input."""

MASKED_VECTOR_KEY = "vector"

PLAIN_INPUT_RECORD = "fedsec.plain-input"
"""ArrayRecord with a client's encoded update and blinding vector, in clear.

Only plain mode with verification sends it; the secure mod never does.
"""

ENCODED_UPDATE_KEY = "update"
BLINDING_KEY = "blinding"

AGGREGATE_RECORD = "fedsec.aggregate"
"""ArrayRecord with the aggregate that clients commit against."""

AGGREGATE_KEY = "aggregate"

INPUT_ROUND_RECORD = "fedsec.secagg.input-round"
"""ConfigRecord in ``Context.state`` with the last round in which the client
trained for an input: masked under either key lifetime, or plain."""

VERIFICATION_STATE_RECORD = "fedsec.verification.state"
"""ConfigRecord in ``Context.state`` with the client's verification state."""

VERIFICATION_ARRAYS_RECORD = "fedsec.verification.arrays"
"""ArrayRecord in ``Context.state`` with the vectors a client keeps to commit.

Between its input and its commitment it contains ``ENCODED_UPDATE_KEY`` and
``BLINDING_KEY``; between its commitment and the transcript, ``AGGREGATE_KEY``.
"""

ROUND_MODEL_RECORD = "fedsec.round-model"
"""ArrayRecord in a verify request with the global model of the round it
verifies. The client checks it against the digest it signed and computes the
next model from it, so it keeps no copy of the model between stages."""

VERIFICATION_DECODING_RECORD = "fedsec.verification.decoding"
"""ConfigRecord in ``Context.state`` with the `ModelDecoding` of the round a
client verifies, that round, and, after the commit stage, the number of
included clients."""

ARRAYS_RECORD = "arrays"
"""ArrayRecord with the global model, and with a client's model in plain mode."""

CONFIG_RECORD = "config"
"""ConfigRecord with the training configuration for the ClientApp."""

METRICS_RECORD = "metrics"
"""MetricRecord with a client's training metrics."""

NUM_EXAMPLES_KEY = "num-examples"


def to_config_record(fields: Fields) -> ConfigRecord:
    """Wrap protocol fields in a ConfigRecord."""
    return ConfigRecord(dict(fields))


def protocol_fields(content: RecordDict) -> dict[str, object]:
    """Return the protocol fields of a message, or raise ``ProtocolError``."""
    record = content.config_records.get(PROTOCOL_RECORD)
    if record is None:
        raise ProtocolError(f"The message has no {PROTOCOL_RECORD!r} ConfigRecord.")
    return dict(record)


def encoding_fields(params: EncodingParams) -> Fields:
    """Convert encoding parameters to record fields."""
    return {
        "clip-range": params.clip_range,
        "quantization-levels": params.quantization_levels,
        "modulus": params.modulus,
        "max-weight": params.max_weight,
        "max-clients": params.max_clients,
        "noise-headroom": params.noise_headroom,
    }


def parse_encoding(fields: Mapping[str, object]) -> EncodingParams:
    """Parse and check untrusted encoding parameters."""
    clip_range = fields.get("clip-range")
    if not isinstance(clip_range, float):
        raise ProtocolError(
            "Field 'clip-range' must be of type float. "
            f"Found {type(clip_range).__name__}."
        )
    try:
        return EncodingParams(
            clip_range=clip_range,
            quantization_levels=_field(fields, "quantization-levels", int),
            modulus=_field(fields, "modulus", int),
            max_weight=_field(fields, "max-weight", int),
            max_clients=_field(fields, "max-clients", int),
            noise_headroom=_field(fields, "noise-headroom", int),
        )
    except ValueError as error:
        raise ProtocolError(f"Invalid encoding parameters: {error}") from None


def array_to_numpy(key: str, array: Array) -> NDArray[Any]:
    """Convert one untrusted Array to a numpy array.

    Raises:
        ProtocolError: If the array is not a well-formed serialized numpy
            array, if its dtype and shape differ from the ones the Array
            declares, or if its values have zero bytes each (a huge shape
            that costs nothing on the wire), naming ``key``.

    """
    try:
        decoded = array.numpy()
    except ARRAY_DECODE_ERRORS as error:
        raise ProtocolError(
            f"Array {key!r} must be a serialized numpy array. Found "
            f"stype {array.stype!r}: {type(error).__name__}: {error}"
        ) from None
    if str(decoded.dtype) != array.dtype or list(decoded.shape) != list(array.shape):
        raise ProtocolError(
            f"Array {key!r} declares dtype {array.dtype!r} and shape "
            f"{list(array.shape)}, but its data has dtype {str(decoded.dtype)!r} "
            f"and shape {list(decoded.shape)}."
        )
    if decoded.dtype.itemsize == 0 and decoded.size:
        raise ProtocolError(
            f"Array {key!r} has dtype {str(decoded.dtype)!r}, whose values take "
            "no bytes, and must be empty. Found "
            f"{decoded.size} values."
        )
    return decoded


def arrays_to_numpy(record: ArrayRecord) -> dict[str, NDArray[np.generic]]:
    """Convert an ArrayRecord to numpy arrays, keeping its key order.

    Raises:
        ProtocolError: If an array is not a well-formed serialized numpy array.

    """
    return {key: array_to_numpy(key, array) for key, array in record.items()}


def check_client_arrays(
    received: Mapping[str, NDArray[np.generic]],
    sent: Mapping[str, NDArray[np.generic]],
) -> None:
    """Check that a client's model matches the global model it was sent.

    Raises:
        ValueError: A key is missing or extra, or an array changed shape or
            dtype, or a float array contains NaN or inf; the message names it.

    """
    missing = [key for key in sent if key not in received]
    extra = [key for key in received if key not in sent]
    if missing or extra:
        raise ValueError(
            f"The returned arrays must have the keys of the global model. "
            f"Missing: {missing}; extra: {extra}."
        )
    for key, reference in sent.items():
        array = received[key]
        if array.shape != reference.shape or array.dtype != reference.dtype:
            raise ValueError(
                f"Array {key!r} must have shape {reference.shape} and dtype "
                f"{reference.dtype}. Found shape {array.shape} and dtype {array.dtype}."
            )
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            raise ValueError(f"Array {key!r} contains NaN or inf values.")


def single_array_record(content: RecordDict, *, role: str) -> ArrayRecord:
    """Return the only ArrayRecord of a message, or raise ``ValueError``."""
    records = content.array_records
    if len(records) != 1:
        raise ValueError(
            f"The {role} must carry exactly one ArrayRecord. Found {len(records)}."
        )
    return next(iter(records.values()))


def num_examples(content: RecordDict, *, max_weight: int | None = None) -> int:
    """Return the ``num-examples`` metric of a reply as a checked integer."""
    records = content.metric_records
    if len(records) != 1:
        raise ValueError(
            f"The reply must carry exactly one MetricRecord. Found {len(records)}."
        )
    value = next(iter(records.values())).get(NUM_EXAMPLES_KEY)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(
            f"Metric {NUM_EXAMPLES_KEY!r} must be a non-negative integer. "
            f"Found {value!r}."
        )
    if max_weight is not None and value > max_weight:
        raise ValueError(
            f"Metric {NUM_EXAMPLES_KEY!r} must not exceed max_weight {max_weight}. "
            f"Found {value}."
        )
    return value


def content_bytes(content: RecordDict) -> int:
    """Return the payload bytes of a message's records.

    Array data counts its serialized bytes, numbers 8 bytes, strings and bytes
    their length, and every key its length; protobuf framing is not counted.
    """
    total = 0
    for name, record in content.items():
        total += len(name)
        if isinstance(record, ArrayRecord):
            total += sum(len(key) + len(array.data) for key, array in record.items())
            continue
        for key, value in record.items():
            total += len(key)
            values = value if isinstance(value, list) else [value]
            total += sum(
                len(item) if isinstance(item, str | bytes) else 8 for item in values
            )
    return total
