"""The suite's guard against values computed from the clock at import or collection
(tests/_timeless.py, applied by tests/conftest.py)."""

from __future__ import annotations

import datetime
import time
import types

import jwt
import pytest

from tests._timeless import module_constants, time_dependent

SECRET = "a-test-secret-of-at-least-32-bytes!!"


def test_a_signed_token_with_an_expiry_is_named() -> None:
    now = time.time()
    token = jwt.encode({"sub": "x", "exp": int(now) + 300}, SECRET, algorithm="HS256")
    headers = [("Authorization", f"Bearer {token}"), ("X-API-Key", "k")]
    assert list(time_dependent(headers, "parameter 'headers'", now)) == [
        "parameter 'headers'[0][1] is a JWT with exp"
    ]
    assert list(time_dependent({"token": token}, "TOKENS", now)) == [
        "TOKENS['token'] is a JWT with exp"
    ]


@pytest.mark.parametrize(
    "value",
    [
        lambda now: now + 60,
        lambda now: int(now) - 3600,
        lambda now: datetime.datetime.fromtimestamp(now, datetime.UTC),
        datetime.datetime.fromtimestamp,  # naive, local time
    ],
    ids=["float", "int", "aware-datetime", "naive-datetime"],
)
def test_a_timestamp_of_now_is_named(value: object) -> None:
    now = time.time()
    assert callable(value)
    found = list(time_dependent((1, value(now)), "p", now))
    assert len(found) == 1
    assert found[0].startswith("p[1] is a ")


@pytest.mark.parametrize(
    "value",
    [
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",  # a JWT without time claims
        "not.a.token",
        datetime.datetime(2025, 1, 31, 12, tzinfo=datetime.UTC),  # a fixed value
        300,
        True,
        lambda: jwt.encode({"exp": 1}, SECRET),  # deferred: made when the test runs
    ],
    ids=["jwt-without-time", "dotted-text", "fixed-datetime", "small-int", "bool", "lambda"],
)
def test_values_that_are_not_from_the_clock(value: object) -> None:
    assert list(time_dependent(value, "p")) == []


def test_module_constants_skip_functions_classes_and_imports() -> None:
    module = types.ModuleType("fake")
    module.TOKEN_AT = time.time()  # type: ignore[attr-defined]
    module.helper = lambda: None  # type: ignore[attr-defined]
    module.time = time  # type: ignore[attr-defined]
    module.Kind = int  # type: ignore[attr-defined]
    assert [name for name, _ in module_constants(module)] == ["TOKEN_AT"]
