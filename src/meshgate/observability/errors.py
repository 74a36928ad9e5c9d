"""Every error the observability package raises, rooted at
:class:`meshgate.errors.MeshgateError`.

Catch :class:`ObservabilityError` for anything it raises on purpose. The HTTP
layer translates :class:`OtlpDecodeError` into the OTLP answer the exporter
expects (400 with a ``google.rpc.Status``) and :class:`QueryError` into a 400
problem document.
"""

from __future__ import annotations

from meshgate.errors import MeshgateError

__all__ = [
    "ObservabilityError",
    "OtlpDecodeError",
    "QueryError",
    "UnsupportedMediaTypeError",
]


class ObservabilityError(MeshgateError):
    """The root of every error the observability package raises on purpose."""


class OtlpDecodeError(ObservabilityError, ValueError):
    """An OTLP export request could not be decoded (bad protobuf, JSON, ids or encoding)."""


class UnsupportedMediaTypeError(ObservabilityError, ValueError):
    """An OTLP export request came in a content type or encoding the receiver does not read."""


class QueryError(ObservabilityError, ValueError):
    """A query parameter is malformed; the message names it, its value and the expected form."""

    def __init__(self, parameter: str, value: str, expected: str) -> None:
        self.parameter = parameter
        """The query parameter that was bad, such as ``slow``."""
        self.value = value
        """Its value as given."""
        super().__init__(f"{parameter}={value!r}: {expected}")
