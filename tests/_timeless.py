"""A guard for the suite: nothing time-dependent may be computed at import or
collection (a token signed into a ``parametrize`` list, an expiry in a module
constant), because a slower run would find it expired by the time the test runs.

:func:`time_dependent` names such values; ``tests/conftest.py`` applies it to every
collected test's parameters and to its module's constants, and fails the tests that
hold one with the reason.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import re
import time
import types
from collections.abc import Iterator

__all__ = ["time_dependent"]

WINDOW = 2 * 86400.0
"""A timestamp this close to now (seconds either way) was taken from the clock."""

_JWT_RE = re.compile(r"(?:Bearer )?(eyJ[\w-]*)\.([\w-]+)\.([\w-]*)")
_TIME_CLAIMS = ("exp", "nbf", "iat")
_MAX_DEPTH = 6


def _jwt_claims(text: str) -> dict[str, object] | None:
    match = _JWT_RE.fullmatch(text.strip())
    if match is None:
        return None
    payload = match[2]
    try:
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _near_now(value: float, now: float) -> bool:
    return abs(value - now) < WINDOW


def time_dependent(value: object, where: str, now: float | None = None) -> Iterator[str]:
    """Why ``value`` (found at ``where``) was computed from the clock: a JWT with an
    expiry, a datetime or an epoch timestamp within two days of now. Looks inside
    lists, tuples, sets and dicts."""
    now = time.time() if now is None else now
    yield from _walk(value, where, now, 0)


def _walk(value: object, where: str, now: float, depth: int) -> Iterator[str]:
    if depth > _MAX_DEPTH:
        return
    if isinstance(value, str):
        claims = _jwt_claims(value)
        if claims is not None and any(k in claims for k in _TIME_CLAIMS):
            yield f"{where} is a JWT with {'/'.join(k for k in _TIME_CLAIMS if k in claims)}"
    elif isinstance(value, bool):
        return
    elif isinstance(value, int | float):
        if _near_now(float(value), now):
            yield f"{where} is a timestamp of now ({value!r})"
    elif isinstance(value, datetime.datetime):
        stamp = value.timestamp() if value.tzinfo else value.replace(tzinfo=None).timestamp()
        if _near_now(stamp, now):
            yield f"{where} is a datetime of now ({value.isoformat()})"
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{where}[{key!r}]", now, depth + 1)
    elif isinstance(value, list | tuple | set | frozenset):
        for index, item in enumerate(value):
            yield from _walk(item, f"{where}[{index}]", now, depth + 1)


def module_constants(module: types.ModuleType) -> Iterator[tuple[str, object]]:
    """The data a test module defines at import (not its functions, classes or imports)."""
    for name, value in vars(module).items():
        if name.startswith("__") or isinstance(
            value, types.ModuleType | types.FunctionType | type | types.BuiltinFunctionType
        ):
            continue
        yield name, value
