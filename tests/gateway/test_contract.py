"""The filter contract: Deferred, and a chain being a filter itself."""

from __future__ import annotations

import json

import pytest

from meshgate.gateway.contract import PENDING, BuildContext, Deferred, reply
from meshgate.gateway.filters import Chain
from tests.helpers import Client, RawUpstream, gateway_yaml, run_gateway

# ---------------------------------------------------------------------------- Deferred


def test_deferred_runs_callbacks_at_once_and_contains_their_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[object] = []
    deferred = Deferred()

    def boom(_: object) -> None:
        raise ValueError("callback bug")

    deferred.add_done_callback(lambda d: seen.append(d.result()))
    deferred.add_done_callback(boom)
    deferred.add_done_callback(lambda d: seen.append("after"))
    assert not deferred.done()
    deferred.set_result(7)
    assert seen == [7, "after"]  # synchronously, and a failing callback stops no other
    assert "a callback on a deferred result failed" in caplog.text
    deferred.add_done_callback(lambda d: seen.append("late"))
    assert seen[-1] == "late"  # added after it settled: runs at once

    failed = Deferred()
    failed.set_exception(ConnectionError("down"))
    assert isinstance(failed.exception(), ConnectionError)
    with pytest.raises(ConnectionError, match="down"):
        failed.result()


class _Answers:
    name = "answers"

    def __init__(self, status: int) -> None:
        self.status = status
        self.seen = 0

    def request(self, exchange):  # type: ignore[no-untyped-def]
        self.seen += 1
        return reply(exchange, self.status, "forbidden", "no") if self.status else None


class _Waits:
    name = "waits"

    def __init__(self) -> None:
        self.deferred = Deferred()

    def request(self, exchange):  # type: ignore[no-untyped-def]
        return self.deferred


async def test_a_chain_is_a_filter_and_chains_nest() -> None:
    up = await RawUpstream().start()
    async with run_gateway(gateway_yaml({"up": [up.address]}, "  - {name: r, upstream: up}\n")) as (
        worker,
        port,
    ):
        route = worker.runtime.router.routes[0].target
        inner_pass, waits, inner_refuse = _Answers(0), _Waits(), _Answers(403)
        # [[passes, waits], [refuses]]: filters of an inner chain run in order, a
        # wait inside one resumes there, and the outer chain goes on after it.
        route.chain = Chain([Chain([inner_pass, waits]), Chain([inner_refuse])])
        client = await Client.connect(port)
        await client.send(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        async with __import__("asyncio").timeout(5):
            while not inner_pass.seen:
                await __import__("asyncio").sleep(0.01)
        assert inner_refuse.seen == 0
        waits.deferred.set_result(None)
        res = await client.read()
        assert res.status == 403
        assert json.loads(res.body)["route"] == "r"
        assert inner_refuse.seen == 1
    assert up.requests == []


def test_a_build_context_names_config_paths() -> None:
    ctx = BuildContext("routes[3]", "users")
    assert ctx.at("auth.jwt") == "routes[3].auth.jwt"
    assert PENDING is not None
