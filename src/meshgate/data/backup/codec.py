"""Rows in a form that does not depend on the engine: the archive's encoding, and the
checksum that proves a copy equal to its source on any engine.

A row is one line of JSON: an array with one value per column, encoded by the
column's logical type (see :data:`~meshgate.data.backup.manifest.LogicalType`):

=========== =====================================================================
integer     a JSON integer
boolean     ``true`` / ``false``
float       a JSON number (``NaN``, ``Infinity`` as Python's json writes them)
decimal     a string, without trailing zeros (``"12.5"``, ``"0"``)
string/text a string
datetime    ``"2025-01-31T12:00:00.000000"``: UTC, no zone (aware values are converted)
date        ``"2025-01-31"``
time        ``"12:00:00.000000"``
bytes       base64
json        the JSON value itself, keys sorted
uuid        ``"0f8fad5b-d9cb-469f-a165-70867728950e"``
other       a string (the driver's value as text)
=========== =====================================================================

NULL is ``null``. The encoders are liberal in what they take, because each engine's
driver hands back its own Python types (SQLite: text timestamps and 0/1 booleans;
MariaDB: 0/1 booleans and JSON as text; PostgreSQL: aware timestamps): the same
value read from any engine encodes to the same line. That line is the canonical
form the checksum is computed over: ``digest`` is the sum, modulo 2**256, of the
SHA-256 of every line, which does not depend on the order rows come in.
"""

from __future__ import annotations

import base64
import decimal
import hashlib
import json
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from meshgate.data.backup.manifest import ColumnEntry, LogicalType

__all__ = [
    "Converter",
    "Digest",
    "decoder",
    "encode_line",
    "encoder",
    "json_line_encoder",
    "row_converter",
    "row_encoder",
]

Converter = Callable[[Any], Any]
"""Turns one non-NULL value into another (NULL stays NULL)."""

_MOD = 1 << 256
_CONTEXT = decimal.Context(prec=1000, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)


class Digest:
    """The order-independent checksum of a table's rows, and their count."""

    __slots__ = ("_sum", "rows")

    def __init__(self) -> None:
        self._sum = 0
        self.rows = 0

    def add(self, line: bytes) -> None:
        """Count one row, given its canonical line (without the newline)."""
        self._sum += int.from_bytes(hashlib.sha256(line).digest(), "big")
        self.rows += 1

    def hexdigest(self) -> str:
        """The checksum as 64 hex digits."""
        return format(self._sum % _MOD, "064x")


# -- encoders: a driver's value -> the canonical JSON value


def _integer(value: Any) -> int:
    return value if type(value) is int else int(value)


def _boolean(value: Any) -> bool:
    if type(value) is bool:
        return value
    if isinstance(value, bytes | bytearray):  # MySQL BIT(1)
        return any(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "t", "true", "y", "yes", "on"):
            return True
        if lowered in ("0", "f", "false", "n", "no", "off"):
            return False
        raise ValueError(f"{value!r} is not a boolean")
    return bool(value)


def _float(value: Any) -> float:
    return value if type(value) is float else float(value)


def _decimal_text(value: Decimal) -> str:
    if not value.is_finite():
        return str(value)
    if value.is_zero():
        return "0"
    return str(format(_CONTEXT.normalize(value), "f"))


def _decimal(scale: int | None) -> Converter:
    quantum = Decimal(1).scaleb(-scale) if scale is not None and scale >= 0 else None

    def encode(value: Any) -> str:
        if isinstance(value, Decimal):
            number = value
        elif isinstance(value, float):
            # SQLite keeps NUMERIC as a double: its shortest repr is the value meant,
            # and the column's scale drops the binary noise (0.30000000000000004).
            number = Decimal(repr(value))
            if quantum is not None and number.is_finite():
                number = _CONTEXT.quantize(number, quantum)
        else:
            number = Decimal(str(value))
        return _decimal_text(number)

    return encode


def _string(value: Any) -> str:
    if type(value) is str:
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8")
    return str(value)


def _hex_uuid_string(value: Any) -> str:
    # SQLAlchemy's Uuid keeps 32 hex digits where the engine has no UUID type; a copy
    # restored into a native UUID column reads back as a UUID.
    return value.hex if isinstance(value, uuid.UUID) else _string(value)


def _datetime(value: Any) -> str:
    stamp: datetime
    if isinstance(value, str):
        stamp = datetime.fromisoformat(value)
    elif isinstance(value, datetime):
        stamp = value
    else:
        raise ValueError(f"{value!r} is not a timestamp")
    if stamp.tzinfo is not None:
        stamp = stamp.astimezone(UTC).replace(tzinfo=None)
    return stamp.isoformat(timespec="microseconds")


def _date(value: Any) -> str:
    if isinstance(value, datetime):
        return value.date().isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return date.fromisoformat(str(value)).isoformat()


def _time(value: Any) -> str:
    moment: time
    if isinstance(value, timedelta):  # what MySQL drivers return for TIME
        if not timedelta(0) <= value < timedelta(days=1):
            raise ValueError(f"{value!r} is not a time of day")
        moment = (datetime.min + value).time()
    elif isinstance(value, str):
        moment = time.fromisoformat(value)
    elif isinstance(value, time):
        moment = value
    else:
        raise ValueError(f"{value!r} is not a time of day")
    return moment.replace(tzinfo=None).isoformat(timespec="microseconds")


def _bytes(value: Any) -> str:
    if isinstance(value, str):
        value = value.encode("utf-8")
    return base64.b64encode(bytes(value)).decode("ascii")


def _json(value: Any) -> Any:
    if isinstance(value, str | bytes | bytearray):
        return json.loads(value)
    return value


def _uuid(value: Any) -> str:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray) and len(value) == 16:
        return str(uuid.UUID(bytes=bytes(value)))
    return str(uuid.UUID(_string(value)))


def _other(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str | list | dict):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return _bytes(value)
    if isinstance(value, datetime):
        return _datetime(value)
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return _decimal_text(value)
    return str(value)


def encoder(column: ColumnEntry) -> Converter | None:
    """How a driver's value of ``column`` becomes its canonical JSON value (None:
    the value is its own encoding)."""
    kind = column.type
    if kind == "integer":
        return _integer
    if kind == "boolean":
        return _boolean
    if kind == "float":
        return _float
    if kind == "decimal":
        return _decimal(column.scale)
    if kind in ("string", "text"):
        return _hex_uuid_string if column.length == 32 else _string
    simple: dict[LogicalType, Converter] = {
        "datetime": _datetime,
        "date": _date,
        "time": _time,
        "bytes": _bytes,
        "json": _json,
        "uuid": _uuid,
    }
    found: Converter = simple.get(kind, _other)
    return found


def row_converter(funcs: Sequence[Converter | None]) -> Callable[[Sequence[Any]], list[Any]]:
    """A function applying ``funcs[i]`` to the ``i``-th value of a row (NULL stays NULL;
    a None function keeps the value).

    It is compiled into one expression per table: a backup or restore calls it for every
    row, and a loop over the columns costs a third of the time.
    """
    env: dict[str, Any] = {}
    parts = []
    for i, func in enumerate(funcs):
        if func is None:
            parts.append(f"r[{i}]")
        else:
            env[f"f{i}"] = func
            parts.append(f"(None if r[{i}] is None else f{i}(r[{i}]))")
    # The source holds column positions only, never a name or a value.
    source = f"def convert(r):\n    return [{', '.join(parts)}]\n"
    exec(source, env)  # noqa: S102
    convert: Callable[[Sequence[Any]], list[Any]] = env["convert"]
    return convert


def row_encoder(columns: Sequence[ColumnEntry]) -> Callable[[Sequence[Any]], list[Any]]:
    """A function from a driver's row (values in the order of ``columns``) to the
    list of canonical values."""
    return row_converter([encoder(c) for c in columns])


def json_line_encoder(columns: Sequence[ColumnEntry]) -> Callable[[list[Any]], bytes]:
    """How a list of canonical values becomes its line (UTF-8, no newline)."""
    # Keys are sorted only when there are JSON values: sort_keys costs a little.
    sort = any(c.type in ("json", "other") for c in columns)
    dumps = json.JSONEncoder(
        ensure_ascii=False, separators=(",", ":"), sort_keys=sort, allow_nan=True
    ).encode

    def line(values: list[Any]) -> bytes:
        return dumps(values).encode("utf-8")

    return line


def encode_line(columns: Sequence[ColumnEntry]) -> Callable[[Sequence[Any]], bytes]:
    """A driver's row -> its canonical line: :func:`row_encoder` then
    :func:`json_line_encoder`."""
    values = row_encoder(columns)
    line = json_line_encoder(columns)
    return lambda row: line(values(row))


# -- decoders: a canonical JSON value -> the Python value it stands for


def _to_decimal(value: Any) -> Decimal:
    return Decimal(value) if isinstance(value, str) else Decimal(repr(value))


def _to_datetime(value: Any) -> datetime:
    parsed = datetime.fromisoformat(value)
    return parsed.astimezone(UTC).replace(tzinfo=None) if parsed.tzinfo else parsed


def _to_bytes(value: Any) -> bytes:
    return base64.b64decode(value, validate=True)


_DECODERS: dict[LogicalType, Converter | None] = {
    "integer": int,
    "boolean": bool,
    "float": float,
    "decimal": _to_decimal,
    "string": str,
    "text": str,
    "datetime": _to_datetime,
    "date": date.fromisoformat,
    "time": time.fromisoformat,
    "bytes": _to_bytes,
    "json": None,
    "uuid": str,
    "other": None,
}


def decoder(column: ColumnEntry) -> Converter | None:
    """How a canonical value of ``column`` becomes a Python value: int, bool, float,
    Decimal, str, naive UTC datetime, date, time, bytes, a JSON value, a UUID as
    text (None: the JSON value as it is)."""
    return _DECODERS[column.type]
