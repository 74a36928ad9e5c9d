"""The canonical row encoding: the same value read from any engine's driver encodes
to the same line, and the checksum does not depend on the order of the rows."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from meshgate.data.backup.codec import Digest, decoder, encode_line, encoder
from meshgate.data.backup.manifest import ColumnEntry


def col(kind: str, **params: Any) -> ColumnEntry:
    return ColumnEntry(name="c", type=kind, **params)  # type: ignore[arg-type]


# (column, what each engine's driver hands back for one value, its canonical encoding)
SAME_VALUE: list[tuple[ColumnEntry, list[Any], Any]] = [
    (col("boolean"), [True, 1, "1", b"\x01"], True),
    (col("boolean"), [False, 0, "f", b"\x00"], False),
    (col("decimal", scale=2), [Decimal("12.50"), 12.5, "12.50", Decimal("12.5")], "12.5"),
    (col("decimal", scale=2), [Decimal("0.30"), 0.30000000000000004], "0.3"),
    (col("decimal", scale=0), [Decimal("100"), 100, Decimal("1E+2")], "100"),
    (col("decimal"), [Decimal("0.000"), 0, 0.0], "0"),
    (
        col("decimal", precision=40, scale=10),
        [Decimal("123456789012345678901234567890.1234567890")],
        "123456789012345678901234567890.123456789",
    ),
    (
        col("datetime", timezone=True),
        [
            datetime(2025, 1, 31, 12, 0, 0, 5, tzinfo=UTC),
            datetime(2025, 1, 31, 14, 0, 0, 5, tzinfo=timezone(timedelta(hours=2))),
            datetime(2025, 1, 31, 12, 0, 0, 5),
            "2025-01-31 12:00:00.000005",
        ],
        "2025-01-31T12:00:00.000005",
    ),
    (col("date"), [date(2024, 2, 29), "2024-02-29", datetime(2024, 2, 29, 23, 0)], "2024-02-29"),
    (
        col("time"),
        [time(8, 30), timedelta(hours=8, minutes=30), "08:30:00.000000"],
        "08:30:00.000000",
    ),
    (col("bytes"), [b"\x00\xff", bytearray(b"\x00\xff"), memoryview(b"\x00\xff")], "AP8="),
    (
        col("json"),
        ['{"b": 1, "a": [1, 2]}', '{"a":[1,2],"b":1}', b'{"a": [1, 2], "b": 1}'],
        {"a": [1, 2], "b": 1},
    ),
    (
        col("uuid"),
        [
            uuid.UUID("0f8fad5b-d9cb-469f-a165-70867728950e"),
            "0f8fad5bd9cb469fa16570867728950e",
            "0F8FAD5B-D9CB-469F-A165-70867728950E",
            uuid.UUID("0f8fad5b-d9cb-469f-a165-70867728950e").bytes,
        ],
        "0f8fad5b-d9cb-469f-a165-70867728950e",
    ),
    (
        col("string", length=32),
        [uuid.UUID(int=255), "000000000000000000000000000000ff"],
        "000000000000000000000000000000ff",
    ),
    (col("text"), ["ünï", "ünï".encode()], "ünï"),
]


@pytest.mark.parametrize(("column", "raws", "canonical"), SAME_VALUE)
def test_each_drivers_form_of_a_value_encodes_the_same(
    column: ColumnEntry, raws: list[Any], canonical: Any
) -> None:
    encode = encoder(column)
    assert encode is not None
    assert [encode(raw) for raw in raws] == [canonical] * len(raws)
    decode = decoder(column)
    value = decode(canonical) if decode is not None else canonical
    assert encode(value) == canonical  # decoding and encoding again is the identity


def test_lines_are_canonical_json() -> None:
    columns = [col("integer"), col("json"), col("text"), col("float")]
    line = encode_line(columns)
    assert line([1, '{"z": 1, "a": "é"}', None, 0.1]) == '[1,{"a":"é","z":1},null,0.1]'.encode()


@pytest.mark.parametrize(
    ("column", "raw"),
    [(col("datetime"), "yesterday"), (col("boolean"), "maybe"), (col("time"), timedelta(days=2))],
)
def test_a_value_that_is_not_its_type_is_an_error(column: ColumnEntry, raw: Any) -> None:
    encode = encoder(column)
    assert encode is not None
    with pytest.raises(ValueError, match=r"."):
        encode(raw)


def test_the_digest_ignores_order_but_counts_every_row() -> None:
    rows = [b"[1]", b"[2]", b"[3]", b"[2]"]

    def digest(lines: list[bytes]) -> tuple[int, str]:
        made = Digest()
        for line in lines:
            made.add(line)
        return made.rows, made.hexdigest()

    assert digest(rows) == digest(list(reversed(rows)))
    assert digest(rows) != digest(rows[:3])  # a duplicate row counts
    assert digest(rows)[1] != digest([b"[1]", b"[2]", b"[3]", b"[4]"])[1]
    assert len(digest([])[1]) == 64
