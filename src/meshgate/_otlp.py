"""The few protobuf encoders OTLP needs, written by hand for speed.

The OpenTelemetry exporters build protobuf message objects field by field, which costs
tens of microseconds per span; meshgate's processes export every span of a traced
request, so they encode the bytes directly (the gateway in
:mod:`meshgate.gateway.tracing`, services in :mod:`meshgate.service._exporter`). Field
numbers follow opentelemetry-proto's ``trace.proto`` and ``common.proto``; the tests
decode what these write with the official message classes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "any_value",
    "attribute",
    "attributes",
    "env_headers",
    "fixed64",
    "key_value",
    "length_field",
    "varint",
]

_F64 = struct.Struct("<d")
_Q = struct.Struct("<Q")
_BYTE = [bytes((i,)) for i in range(128)]


def varint(value: int) -> bytes:
    """``value`` (0 to 2**64 - 1) as a protobuf varint."""
    if value < 128:
        return _BYTE[value]
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def length_field(field: int, data: bytes) -> bytes:
    """A length-delimited field: a message, a string or bytes."""
    return varint(field << 3 | 2) + varint(len(data)) + data


def fixed64(field: int, value: int) -> bytes:
    return varint(field << 3 | 1) + _Q.pack(value & 0xFFFFFFFFFFFFFFFF)


def any_value(value: Any) -> bytes:
    """An ``AnyValue`` message for a Python attribute value (sequences as arrays; other
    objects as their text)."""
    if isinstance(value, bool):
        return b"\x10" + _BYTE[int(value)]
    if isinstance(value, int):
        return b"\x18" + varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _F64.pack(value)
    if isinstance(value, str):
        return length_field(1, value.encode())
    if isinstance(value, bytes):
        return length_field(7, value)
    if isinstance(value, Sequence):
        return length_field(5, b"".join(length_field(1, any_value(v)) for v in value))
    return length_field(1, str(value).encode())


def key_value(key: str, value: Any) -> bytes:
    """A ``KeyValue`` message."""
    return length_field(1, key.encode()) + length_field(2, any_value(value))


def attribute(field: int, key: str, value: Any) -> bytes:
    """One attribute as a repeated ``KeyValue`` field ``field`` of its message."""
    return length_field(field, key_value(key, value))


def attributes(field: int, values: Mapping[str, Any] | None) -> bytes:
    """Every attribute of ``values`` as repeated ``KeyValue`` fields ``field``."""
    if not values:
        return b""
    return b"".join(length_field(field, key_value(k, v)) for k, v in values.items())


def env_headers(environ: Mapping[str, str]) -> dict[str, str]:
    """The export headers the environment asks for: ``OTEL_EXPORTER_OTLP_TRACES_HEADERS``
    or ``OTEL_EXPORTER_OTLP_HEADERS`` (``key=value,key2=value2``, percent-encoded, as the
    OpenTelemetry specification says)."""
    from urllib.parse import unquote  # noqa: PLC0415 - rarely needed

    raw = environ.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or environ.get(
        "OTEL_EXPORTER_OTLP_HEADERS", ""
    )
    headers: dict[str, str] = {}
    for item in raw.split(","):
        key, eq, value = item.partition("=")
        if eq and key.strip():
            headers[unquote(key.strip())] = unquote(value.strip())
    return headers
