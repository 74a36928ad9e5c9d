"""The gateway's minimal Redis client and the rate limiter's pre-encoded commands."""

from __future__ import annotations

import pytest

from meshgate.config import loads
from meshgate.gateway.filters.ratelimit import _SCRIPT_SHA, GCRA_SCRIPT, RateLimitFilter
from meshgate.gateway.resp import RedisError, _parse, command


def test_command_framing() -> None:
    assert command(b"GET", b"k") == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"


@pytest.mark.parametrize(
    ("wire", "value", "end"),
    [
        (b":42\r\n", 42, 5),
        (b"+OK\r\n", b"OK", 5),
        (b"$3\r\nabc\r\n", b"abc", 9),
        (b"$-1\r\n", None, 5),
        (b"*2\r\n:1\r\n:-5\r\n", [1, -5], 13),
        (b"*0\r\n", [], 4),
    ],
)
def test_parse_replies(wire: bytes, value: object, end: int) -> None:
    assert _parse(bytearray(wire), 0) == (value, end)


@pytest.mark.parametrize("partial", [b":4", b"$3\r\nab", b"*2\r\n:1\r\n"])
def test_incomplete_replies_wait_for_more(partial: bytes) -> None:
    assert _parse(bytearray(partial), 0) is None


def test_error_reply_is_a_redis_error() -> None:
    parsed = _parse(bytearray(b"-NOSCRIPT No matching script\r\n"), 0)
    assert parsed is not None
    assert isinstance(parsed[0], RedisError)
    assert str(parsed[0]).startswith("NOSCRIPT")


def test_pre_encoded_rate_limit_commands_match_the_encoder() -> None:
    config = loads(
        "upstreams: {up: {endpoints: ['127.0.0.1:9']}}\n"
        "routes:\n  - name: r\n    upstream: up\n"
        "    rate_limit: {rate: 5/s, burst: 2, redis: 'redis://127.0.0.1:6379/0'}\n"
    )
    assert config.routes[0].rate_limit is not None
    f = RateLimitFilter(config.routes[0].rate_limit, "r", config)
    key = b"{meshgate:rl:r:ip:1.2.3.4}"
    args = (b"200000", b"400000")
    framed = b"$%d\r\n%s\r\n" % (len(key), key) + f._args_frame
    assert f._evalsha + framed == command(b"EVALSHA", _SCRIPT_SHA, b"1", key, *args)
    assert f._eval + framed == command(b"EVAL", GCRA_SCRIPT, b"1", key, *args)
