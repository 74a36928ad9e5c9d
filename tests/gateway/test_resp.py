"""The gateway's minimal Redis client and the rate limiter's pre-encoded commands.

Connection tests talk to a real Redis at 127.0.0.1:6379 (skipped without one, failed
with MESHGATE_REQUIRE_SERVICES=1), through a TLS or unix socket front where needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trustme

from meshgate.config import loads
from meshgate.gateway.contract import BuildContext
from meshgate.gateway.filters.ratelimit import _SCRIPT_SHA, GCRA_SCRIPT, RateLimitFilter
from meshgate.gateway.resp import FollowUp, RedisError, RespClient, _parse, command
from tests.conftest import service_url


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
    f = RateLimitFilter(config.routes[0].rate_limit, BuildContext("routes[0]", "r"))
    key = b"{meshgate:rl:r:ip:1.2.3.4}"
    args = (b"200000", b"400000")
    framed = b"$%d\r\n%s\r\n" % (len(key), key) + f._args_frame
    assert f._evalsha + framed == command(b"EVALSHA", _SCRIPT_SHA, b"1", key, *args)
    assert f._eval + framed == command(b"EVAL", GCRA_SCRIPT, b"1", key, *args)


# ---------------------------------------------------------------------------- a real Redis

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def real_redis() -> None:
    """Skip (or fail, with MESHGATE_REQUIRE_SERVICES=1) without a Redis on 6379."""
    service_url("redis")


@contextlib.contextmanager
def acl_user(keys: str = "*") -> Iterator[tuple[str, str]]:
    """A Redis ACL user (name, password) allowed every command on ``keys``; deleted
    at exit. The password needs percent-encoding in a URL."""
    import redis

    name = f"meshgate-test-{uuid.uuid4().hex}"
    password = f"p@ss:w/rd %{uuid.uuid4().hex}"
    admin = redis.Redis.from_url(REDIS_URL)
    try:
        admin.acl_setuser(
            name, enabled=True, passwords=[f"+{password}"], keys=[keys], commands=["+@all"]
        )
        yield name, password
    finally:
        admin.acl_deluser(name)
        admin.close()


def user_url(name: str, password: str, rest: str = "127.0.0.1:6379/0") -> str:
    return f"redis://{quote(name, safe='')}:{quote(password, safe='')}@{rest}"


@contextlib.asynccontextmanager
async def redis_front(
    *, tls: ssl.SSLContext | None = None, unix: str | None = None
) -> AsyncIterator[str]:
    """A TLS (``tls``) or unix socket (``unix``) listener in front of the real Redis,
    copying bytes both ways; yields its host:port, or the socket path."""
    writers: list[asyncio.StreamWriter] = []
    copies: list[asyncio.Future[Any]] = []

    async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        redis_reader, redis_writer = await asyncio.open_connection("127.0.0.1", 6379)
        writers.extend((writer, redis_writer))
        both = asyncio.gather(copy(reader, redis_writer), copy(redis_reader, writer))
        copies.append(both)
        await both

    if unix is not None:
        server = await asyncio.start_unix_server(serve, unix)
        address = unix
    else:
        server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)
        address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield address
    finally:
        server.close()
        for writer in writers:
            writer.transport.abort()
        for both in copies:
            with contextlib.suppress(Exception):
                await both
        await server.wait_closed()


@pytest.mark.services
@pytest.mark.usefixtures("real_redis")
async def test_url_with_a_username_authenticates_as_that_acl_user() -> None:
    with acl_user() as (name, password):
        client = RespClient(user_url(name, password))
        try:
            assert await client.call(command(b"ACL", b"WHOAMI")) == name.encode()
        finally:
            client.close()


@pytest.mark.services
@pytest.mark.usefixtures("real_redis")
async def test_a_failed_auth_is_not_kept_as_an_unauthenticated_connection() -> None:
    with acl_user() as (name, _):
        client = RespClient(user_url(name, "wrong"))
        try:
            for _ in range(3):
                with pytest.raises(RedisError, match="WRONGPASS"):
                    await client.call(command(b"PING"))
        finally:
            client.close()


@pytest.mark.services
@pytest.mark.usefixtures("real_redis")
async def test_rediss_url_speaks_tls_and_verifies_the_server(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with acl_user() as (name, password):
        async with redis_front(tls=server_context) as address:
            url = user_url(name, password, f"{address}/0").replace("redis://", "rediss://")
            client = RespClient(f"{url}?ssl_ca_certs={quote(str(ca_file))}")
            untrusted = RespClient(f"rediss://{address}/0")
            try:
                assert await client.call(command(b"ACL", b"WHOAMI")) == name.encode()
                with pytest.raises(RedisError, match="CERTIFICATE_VERIFY_FAILED"):
                    await untrusted.call(command(b"PING"))
            finally:
                client.close()
                untrusted.close()


@pytest.mark.services
@pytest.mark.usefixtures("real_redis")
async def test_unix_socket_url_takes_the_database_from_the_query(tmp_path: Path) -> None:
    async with redis_front(unix=str(tmp_path / "redis.sock")) as path:
        client = RespClient(f"unix://{path}?db=3")
        try:
            info = await client.call(command(b"CLIENT", b"INFO"))
            assert b" db=3 " in info
        finally:
            client.close()


@pytest.mark.services
@pytest.mark.usefixtures("real_redis")
async def test_decide_may_go_on_with_another_command() -> None:
    client = RespClient(REDIS_URL)

    def retry(reply: object) -> object:
        assert isinstance(reply, RedisError)
        raise FollowUp(client.send(command(b"ECHO", b"again"), lambda second: (reply, second)))

    try:
        first, second = await client.send(command(b"NO-SUCH-COMMAND"), retry)
        assert isinstance(first, RedisError)
        assert second == b"again"
    finally:
        client.close()


async def test_commands_of_one_loop_turn_leave_in_one_write(real_redis: None) -> None:
    """Ten commands sent in one turn of the loop: one write, ten replies in order."""
    client = RespClient("redis://127.0.0.1:6379/0")
    try:
        await client.call(command(b"PING"))
        protocol = client._protocol
        assert protocol is not None
        assert protocol.transport is not None
        writes: list[bytes] = []
        real = protocol.transport

        class Counting:
            """The transport, counting writes (uvloop's cannot be patched)."""

            def write(self, data: bytes) -> None:
                writes.append(data)
                real.write(data)

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

        protocol.transport = Counting()  # type: ignore[assignment]
        pending = [client.send(command(b"ECHO", b"%d" % i), lambda r: r) for i in range(10)]
        done = asyncio.get_running_loop().create_future()
        pending[-1].add_done_callback(lambda _: done.set_result(None))
        await asyncio.wait_for(done, 5)
        assert len(writes) == 1
        assert [p.result() for p in pending] == [b"%d" % i for i in range(10)]
    finally:
        client.close()
