"""The access log: JSON lines written off the request path, no secrets in them."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from meshgate.gateway.accesslog import AccessLog
from tests.helpers import Client, RawUpstream, gateway_yaml, run_gateway


async def test_requests_are_logged_as_json_lines_without_query(tmp_path: Path) -> None:
    log_path = tmp_path / "access.log"
    up = await RawUpstream().start()
    config = gateway_yaml(
        {"up": [up.address]},
        "  - {name: all, upstream: up}\n",
    ).replace("access_log: {enabled: false}", f"access_log: {{path: '{log_path}'}}")
    async with run_gateway(config) as (_, port):
        client = await Client.connect(port)
        ok = await client.request("GET", "/users/7?token=s3cret", [("X-Request-ID", "abc-1")])
        await client.request("DELETE", "/nothing")
        await client.close()
        async with asyncio.timeout(10):  # written within a flush tick or so
            while len(log_path.read_text().splitlines() if log_path.exists() else []) < 2:
                await asyncio.sleep(0.02)
    await up.close()
    lines = log_path.read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["method"] == "GET"
    assert first["path"] == "/users/7"
    assert first["status"] == 200
    assert first["route"] == "all"
    assert first["request_id"] == "abc-1" == ok.header("X-Request-ID")
    assert first["client"] == "127.0.0.1"
    assert first["bytes"] == len(b"/users/7?token=s3cret")
    assert first["duration_ms"] >= first["upstream_ms"] > 0
    assert second["method"] == "DELETE"
    assert second["status"] == 200
    assert "s3cret" not in log_path.read_text()


def test_close_writes_what_is_left(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    log = AccessLog(str(path), worker=3)
    log.records.append(
        ("::1", b"POST", b"/x?y=1", 502, "", b"rid", 0, 0.0012, 0.0, "", b"", time.perf_counter())
    )
    log.close()
    entry = json.loads(path.read_text())
    assert abs(entry["ts"] - time.time()) < 60  # the request's start, as a wall-clock time
    assert entry["route"] is None
    assert entry["worker"] == 3
    assert entry["path"] == "/x"
    assert entry["duration_ms"] == 1.2


def test_every_field_is_valid_json_whatever_the_request_held(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    log = AccessLog(str(path), worker=1)
    odd = b'/a"b\\c/caf\xc3\xa9/\x7f?q'
    log.records.append(
        (
            "10.0.0.1",
            b"GET",
            odd,
            200,
            "r",
            b'id"with\\quote',
            5,
            0.001,
            0.0005,
            "client_closed",
            b"ab" * 16,
            0.0,
        )
    )
    log.records.append(("10.0.0.1", b"GET", b"/plain", 404, "", b"x", 0, 0.0, 0.0, "", b"", 0.0))
    log.close()
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert first["path"] == odd.split(b"?")[0].decode("latin-1")
    assert first["request_id"] == 'id"with\\quote'
    assert first["trace_id"] == "ab" * 16
    assert first["aborted"] == "client_closed"
    assert first["route"] == "r"
    assert first["upstream_ms"] == 0.5
    assert second["route"] is None
    assert second["aborted"] is None
    assert second["trace_id"] == ""
