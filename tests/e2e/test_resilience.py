"""Resilience of ``meshgate gateway`` as a real process: an upstream killed under load,
reloads under load with a WebSocket open, active checks, drain and enable, health
shared between gateway nodes through Redis, and pools that survive reloads.

Every upstream here runs on loopback with an ephemeral port: demo upstreams as
processes (so that one can be SIGKILLed), and small threaded servers where a test
must control an answer (``/health``) or count TCP connections.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from tests.e2e.conftest import (
    READY_TIMEOUT,
    TOKEN,
    DemoUpstream,
    Gateway,
    GatewayFactory,
    Pid,
    refuses_connections,
    tail,
    wait_dead,
)
from tests.e2e.test_gateway_process import eventually, get
from tests.helpers import free_port

pytestmark = pytest.mark.e2e

API_ROUTE = "  - {name: api, match: {path_prefix: /api}, upstream: up, strip_prefix: true}\n"
REDIS_URL = "redis://127.0.0.1:6379/0"

# Active checks: a probe a second and one answer flips an endpoint. The timeout is the
# whole interval so that a busy machine does not fail the probes of the steady endpoint.
FAST_CHECKS = (
    "{path: /health, interval: 1s, timeout: 1s, healthy_threshold: 1, unhealthy_threshold: 1}"
)


def doc(upstreams: str, routes: str = API_ROUTE) -> str:
    """A gateway config with the admin API on an ephemeral port and :data:`TOKEN`."""
    return (
        "gateway:\n  listen: 127.0.0.1:0\n  access_log: {enabled: false}\n"
        f"  admin: {{listen: '127.0.0.1:0', token: '{TOKEN}'}}\n  drain_timeout: 5\n"
        f"upstreams:\n{upstreams}routes:\n{routes}"
    )


def upstream(name: str, endpoints: list[str], **fields: str) -> str:
    """One line of ``upstreams:``: ``name: {endpoints: [...], field: value, ...}``."""
    eps = ", ".join(f"'{e}'" for e in endpoints)
    extra = "".join(f", {key}: {value}" for key, value in fields.items())
    return f"  {name}: {{endpoints: [{eps}]{extra}}}\n"


def endpoints(gw: Gateway, name: str = "up") -> dict[str, dict[str, Any]]:
    """GET /upstreams: the endpoints of upstream ``name``, by label."""
    res = gw.admin("GET", "/upstreams")
    assert res.status_code == 200, res.text
    found: dict[str, dict[str, Any]] = res.json()["upstreams"][name]["endpoints"]
    return found


def served_by(gw: Gateway, count: int, path: str = "/api/who") -> Counter[str]:
    """Send ``count`` requests, each on a new connection (so both workers take some),
    and count which instance answered; every one must be a 200."""
    seen: Counter[str] = Counter()
    for i in range(count):
        reply = get(gw.port, f"{path}/{i}")
        assert reply.status == 200, (reply.status, reply.body, gw.log())
        seen[reply.json()["instance"]] += 1
    return seen


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{(?P<labels>[^}}]*)\}})? (?P<value>\S+)$")
    for line in text.splitlines():
        match = pattern.match(line)
        if match is None:
            continue
        have = match["labels"] or ""
        if all(f'{key}="{value}"' in have for key, value in labels.items()):
            total += float(match["value"])
    return total


# ---------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Outcome:
    """One request of a load run: when it ran and what came back (or what broke)."""

    started: float
    ended: float
    status: int | None
    instance: str | None
    error: str | None

    @property
    def failed(self) -> bool:
        return self.error is not None or self.status != 200


class Load:
    """Client threads sending keep-alive GETs in a loop, recording every outcome.

    A thread whose connection breaks records the error and opens a new connection;
    a connection the gateway closes politely (``Connection: close``) is replaced
    without counting anything.
    """

    def __init__(self, port: int, path: str, threads: int) -> None:
        self.port = port
        self.path = path
        self._stop = threading.Event()
        self._results: list[list[Outcome]] = [[] for _ in range(threads)]
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"load-{i}", daemon=True)
            for i in range(threads)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)
        assert not any(t.is_alive() for t in self._threads), "a load thread hung"
        return self.outcomes

    @property
    def outcomes(self) -> list[Outcome]:
        return sorted((o for r in self._results for o in r), key=lambda o: o.started)

    def _run(self, index: int) -> None:
        results = self._results[index]
        conn: http.client.HTTPConnection | None = None
        n = 0
        while not self._stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            n += 1
            started = time.monotonic()
            try:
                conn.request("GET", f"{self.path}/{index}/{n}")
                res = conn.getresponse()
                body = res.read()
            except Exception as exc:  # every client-side error is a failed request
                results.append(Outcome(started, time.monotonic(), None, None, repr(exc)))
                conn.close()
                conn = None
                continue
            instance = None
            with contextlib.suppress(ValueError, AttributeError):
                instance = json.loads(body).get("instance")
            results.append(Outcome(started, time.monotonic(), res.status, instance, None))
            if res.will_close:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()


def describe_failures(outcomes: list[Outcome], origin: float) -> str:
    failed = [o for o in outcomes if o.failed]
    shown = "\n".join(
        f"  t={o.started - origin:+.3f}s status={o.status} error={o.error}" for o in failed[:15]
    )
    return f"{len(failed)} of {len(outcomes)} requests failed:\n{shown}"


# ---------------------------------------------------------------------------- upstreams


@dataclass(frozen=True)
class DemoProcess:
    """A ``meshgate demo-upstream`` process that a test may kill."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def start_demo(tmp_path: Path) -> Iterator[Callable[[str], DemoProcess]]:
    """Start a demo upstream answering as ``name``; every one is stopped by PID at teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str) -> DemoProcess:
        log_path = tmp_path / f"demo-{name}.stderr"
        for _ in range(3):
            # free_port() can race with another process taking the port; retry on that.
            port = free_port()
            with log_path.open("wb") as err:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "meshgate",
                        "demo-upstream",
                        "--listen",
                        f"127.0.0.1:{port}",
                        "--name",
                        name,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    stdin=subprocess.DEVNULL,
                )
            started.append(proc)
            deadline = time.monotonic() + READY_TIMEOUT
            while proc.poll() is None and time.monotonic() < deadline:
                if "demo upstream" in log_path.read_text(errors="replace"):
                    break
                time.sleep(0.05)
            if proc.poll() is None and not refuses_connections(port):
                return DemoProcess(name, port, proc)
            proc.kill()
            proc.wait(10)
        pytest.fail(f"demo upstream {name!r} did not start:\n{tail(log_path)}")

    yield start

    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)


class _Server(ThreadingHTTPServer):
    upstream: ControlledUpstream


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the gateway's pool expects
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.upstream.accepted()

    def do_GET(self) -> None:
        up = self.server.upstream
        if self.path == "/health":
            up.checked()
            status = 200 if up.healthy else 503
            body = b'{"healthy": %s}\n' % (b"true" if up.healthy else b"false")
        else:
            up.served()
            status = 200
            body = json.dumps({"instance": up.name, "path": self.path}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass


class ControlledUpstream:
    """An HTTP/1.1 keep-alive upstream in a thread: ``/health`` answers 200 or 503 as
    :attr:`healthy` says, any other path 200 JSON naming :attr:`name`. It counts the
    TCP connections it accepted and the requests it served (health checks aside)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.healthy = True
        self.connections = 0
        self.requests = 0
        self.health_checks = 0
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.upstream = self
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def accepted(self) -> None:
        with self._lock:
            self.connections += 1

    def checked(self) -> None:
        with self._lock:
            self.health_checks += 1

    def served(self) -> None:
        with self._lock:
            self.requests += 1

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@pytest.fixture
def controlled() -> Iterator[Callable[[str], ControlledUpstream]]:
    """Start a :class:`ControlledUpstream`; all are shut down at teardown."""
    started: list[ControlledUpstream] = []

    def start(name: str) -> ControlledUpstream:
        up = ControlledUpstream(name)
        started.append(up)
        return up

    yield start
    for up in started:
        up.close()


# ---------------------------------------------------------------------------- 1. kill


def test_killing_one_of_three_upstreams_under_load_fails_no_request(
    start_gateway: GatewayFactory, start_demo: Callable[[str], DemoProcess]
) -> None:
    a, b, c = start_demo("a"), start_demo("b"), start_demo("c")
    gw = start_gateway(doc(upstream("up", [a.address, b.address, c.address])), workers=2)
    assert set(served_by(gw, 30)) == {"a", "b", "c"}
    victim = Pid.of(b.proc.pid)
    assert victim is not None

    with Load(gw.port, "/api/load", threads=4) as load:
        time.sleep(2.0)
        killed_at = time.monotonic()
        os.kill(b.proc.pid, signal.SIGKILL)
        # Poll the admin API from the moment of the kill: how long until the gateway
        # reports the dead endpoint out of rotation (passive outlier detection, relayed
        # by the supervisor to the other worker).
        state: dict[str, Any] = {}
        seen_out_after: float | None = None
        while time.monotonic() - killed_at < 5.0:
            state = endpoints(gw)[b.address]
            if state["available"] is False:
                seen_out_after = time.monotonic() - killed_at
                break
            time.sleep(0.05)
        time.sleep(max(0.0, killed_at + 4.0 - time.monotonic()))
        outcomes = load.stop()
    b.proc.wait(5)
    assert wait_dead([victim], 5) == []
    print(
        "\n[resilience] killed upstream marked unavailable after: "
        + (f"{seen_out_after:.3f}s" if seen_out_after is not None else "not within 5 s")
        + f"; its state then: {state}"
    )
    metrics = gw.admin("GET", "/metrics").text
    print(
        f"[resilience] load: {len(outcomes)} requests, "
        f"{metric(metrics, 'meshgate_gateway_retries_total', route='api'):g} retried by the gateway"
    )

    # Zero failed requests: every one answered 200, no client-side error at all.
    assert not any(o.failed for o in outcomes), describe_failures(outcomes, killed_at) + gw.log()
    before = [o for o in outcomes if o.ended < killed_at]
    # Requests that started 1 s after the kill: none can have reached the dead process.
    after = [o for o in outcomes if o.started > killed_at + 1.0]
    # About 2 s before and 3 s after, at thousands of requests a second here; 100 is a
    # floor that still shows the load ran, even on a slow machine.
    assert len(before) >= 100, len(before)
    assert len(after) >= 100, len(after)
    by_before = Counter(o.instance for o in before)
    by_after = Counter(o.instance for o in after)
    print(
        f"[resilience] served before the kill: {dict(by_before)}; from 1 s after: {dict(by_after)}"
    )
    assert set(by_before) == {"a", "b", "c"}, by_before
    # Two independent expectations, checked together so that a failure shows both.
    problems = []
    if set(by_after) != {"a", "c"}:
        # Both survivors take traffic: losing one endpoint must not halve the capacity.
        problems.append(
            f"not every survivor served from 1 s after the kill: {dict(by_after)}; "
            f"endpoints now: {endpoints(gw)}"
        )
    if seen_out_after is None or seen_out_after > 2.0:
        # The bound: out of rotation within 2 s of its death.
        took = "not within 5 s" if seen_out_after is None else f"after {seen_out_after:.2f}s"
        problems.append(f"{b.address} (killed) out of rotation {took}; bound 2 s: {state}")
    else:
        assert state["healthy"] is True, state  # no active checks: passive detection took it out
        assert state["ejected_in_workers"] + state["down_elsewhere"] >= 1, state
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------- 2. reloads


def test_twenty_reloads_under_load_fail_nothing_and_keep_a_websocket_open(
    start_gateway: GatewayFactory, demo_upstream: DemoUpstream
) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.protocol import State
    from websockets.sync.client import connect
    from websockets.sync.server import ServerConnection, serve

    def echo(ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            for message in ws:
                ws.send(message)

    server = serve(echo, "127.0.0.1", 0)
    server_thread = threading.Thread(target=server.serve_forever, daemon=True)
    server_thread.start()
    try:
        ws_address = f"127.0.0.1:{server.socket.getsockname()[1]}"
        upstreams = upstream("up", [demo_upstream.address]) + upstream("ws", [ws_address])
        ws_route = "  - {name: ws, match: {path_prefix: /ws}, upstream: ws}\n"

        def routes(i: int) -> str:
            # Each reload changes /api's timeouts, and every other one adds or removes
            # /extra; the /ws route and its upstream never change.
            api = API_ROUTE.replace(
                "strip_prefix: true", f"strip_prefix: true, timeouts: {{read: {30 + i}s}}"
            )
            extra = "  - {name: extra, match: {path_prefix: /extra}, upstream: up}\n"
            return api + ws_route + (extra if i % 2 == 0 else "")

        gw = start_gateway(doc(upstreams, routes(-1)), workers=2)
        reloads = 20
        echoes: list[str] = []
        with connect(f"ws://127.0.0.1:{gw.port}/ws", open_timeout=10) as ws:
            ws.send("hello")
            assert ws.recv(timeout=5) == "hello"
            with Load(gw.port, "/api/load", threads=3) as load:
                time.sleep(0.5)
                reload_started = time.monotonic()
                for i in range(reloads):
                    res = gw.admin("POST", "/config", content=doc(upstreams, routes(i)))
                    assert res.status_code == 200, (i, res.text)
                    assert res.json() == {"ok": True, "reloads": i + 1, "restart_required": []}
                    message = f"echo after reload {i + 1}"
                    ws.send(message)
                    echoes.append(ws.recv(timeout=5))
                reload_ended = time.monotonic()
                time.sleep(0.5)
                outcomes = load.stop()
            assert ws.state is State.OPEN, ws.state
            ws.send("still here")
            assert ws.recv(timeout=5) == "still here"
        print(
            f"\n[resilience] {reloads} reloads in {reload_ended - reload_started:.2f}s "
            f"under {len(outcomes)} requests"
        )
    finally:
        server.shutdown()
        server_thread.join(5)

    assert echoes == [f"echo after reload {i + 1}" for i in range(reloads)]
    assert not any(o.failed for o in outcomes), (
        describe_failures(outcomes, reload_started) + gw.log()
    )
    during = [o for o in outcomes if reload_started <= o.started <= reload_ended]
    # Reloads take a second or more; dozens of requests run meanwhile on any machine.
    assert len(during) >= 50, len(during)
    status = gw.status()
    assert status["reloads"] == reloads
    assert status["last_reload_error"] is None
    metrics = gw.admin("GET", "/metrics").text
    assert metric(metrics, "meshgate_gateway_reloads_total") == reloads
    assert metric(metrics, "meshgate_gateway_aborted_total") == 0
    # The last config (i = 19, odd) has no /extra route; the 20th change took effect.
    assert get(gw.port, "/extra/x").status == 404
    assert [r["name"] for r in gw.admin("GET", "/config").json()["routes"]] == ["api", "ws"]


# ---------------------------------------------------------------------------- 3. active


def test_active_check_takes_an_endpoint_out_and_brings_it_back(
    start_gateway: GatewayFactory,
    demo_upstream: DemoUpstream,
    controlled: Callable[[str], ControlledUpstream],
) -> None:
    flaky = controlled("flaky")
    # round_robin so that "traffic reaches both" is certain in 20 requests (least
    # request follows latency and may prefer one endpoint for a while).
    ups = upstream(
        "up",
        [demo_upstream.address, flaky.address],
        balancer="round_robin",
        health=f"{{active: {FAST_CHECKS}}}",
    )
    gw = start_gateway(doc(ups), workers=2)
    assert set(served_by(gw, 20)) == {"demo", "flaky"}
    eventually(lambda: flaky.health_checks >= 1, 3, "the first active check")
    state = endpoints(gw)
    assert state[flaky.address]["healthy"] is True, state
    assert state[flaky.address]["last_check_error"] is None, state

    flaky.healthy = False
    flipped = time.monotonic()
    # A probe a second and one failure flips it: out within about 1 s; the bound is 3 s.
    state = eventually(
        # The supervisor's verdict, then every worker's (a broadcast apart).
        lambda: (
            (s := endpoints(gw)[flaky.address])["healthy"] is False
            and s["available"] is False
            and s
        ),
        3,
        "the flaky endpoint unhealthy",
    )
    print(f"\n[resilience] active check took it out after {time.monotonic() - flipped:.2f}s")
    assert state["available"] is False, state
    assert state["last_check_error"] == "status 503", state
    assert state["drained"] is False, state
    demo_state = endpoints(gw)[demo_upstream.address]
    assert demo_state["healthy"] is True, (demo_state, gw.log())
    assert served_by(gw, 20) == {"demo": 20}

    flaky.healthy = True
    flipped = time.monotonic()
    state = eventually(
        lambda: (
            (s := endpoints(gw)[flaky.address])["healthy"] is True and s["available"] is True and s
        ),
        3,
        "the flaky endpoint healthy again",
    )
    print(f"[resilience] active check brought it back after {time.monotonic() - flipped:.2f}s")
    assert state["available"] is True, (state, gw.log())
    assert state["last_check_error"] is None, state
    assert set(served_by(gw, 20)) == {"demo", "flaky"}


# ---------------------------------------------------------------------------- 4. drain


def test_drain_and_enable_an_endpoint_through_the_admin_api(
    start_gateway: GatewayFactory, start_demo: Callable[[str], DemoProcess]
) -> None:
    a, b = start_demo("a"), start_demo("b")
    # round_robin: with both available, 20 requests surely reach both.
    gw = start_gateway(doc(upstream("up", [a.address, b.address], balancer="round_robin")))
    assert set(served_by(gw, 20)) == {"a", "b"}
    drain = f"/upstreams/up/endpoints/{b.address}/drain"
    enable = f"/upstreams/up/endpoints/{b.address}/enable"

    for path in (drain, enable, "/upstreams"):
        res = gw.admin("GET" if path == "/upstreams" else "POST", path, token=None)
        assert res.status_code == 401, (path, res.text)
    assert endpoints(gw)[b.address]["drained"] is False, "a refused drain changed nothing"

    res = gw.admin("POST", drain)
    assert res.status_code == 200, res.text
    assert res.json() == {"ok": True, "upstream": "up", "endpoint": b.address, "drained": True}
    state = endpoints(gw)
    assert state[b.address]["drained"] is True, state
    assert state[b.address]["available"] is False, state
    assert state[a.address]["drained"] is False, state
    assert served_by(gw, 20) == {"a": 20}

    res = gw.admin("POST", enable)
    assert res.status_code == 200, res.text
    assert res.json() == {"ok": True, "upstream": "up", "endpoint": b.address, "drained": False}
    state = endpoints(gw)
    assert state[b.address]["drained"] is False, state
    assert state[b.address]["available"] is True, state
    assert set(served_by(gw, 20)) == {"a", "b"}

    for path, what in [
        ("/upstreams/up/endpoints/127.0.0.1:1/drain", "no endpoint '127.0.0.1:1' in upstream 'up'"),
        (
            f"/upstreams/nope/endpoints/{a.address}/enable",
            f"no endpoint '{a.address}' in upstream 'nope'",
        ),
    ]:
        res = gw.admin("POST", path)
        assert res.status_code == 404, (path, res.text)
        body = res.json()
        assert body["ok"] is False
        assert res.headers["content-type"] == "application/problem+json"
        assert (body["error"], body["status"]) == ("no_such_endpoint", 404)
        assert what in body["detail"], body
        assert f"known endpoints: {{'up': ['{a.address}', '{b.address}']}}" in body["detail"], body


# ---------------------------------------------------------------------------- 5. shared


@pytest.mark.services
def test_health_is_shared_between_gateway_nodes_through_redis(
    start_gateway: GatewayFactory,
    demo_upstream: DemoUpstream,
    controlled: Callable[[str], ControlledUpstream],
    redis_prefix: str,
) -> None:
    flaky = controlled("flaky")
    addresses = [demo_upstream.address, flaky.address]
    shared = f"shared: {{redis: '{REDIS_URL}', key_prefix: '{redis_prefix}'}}"
    node_a = start_gateway(
        doc(
            upstream(
                "up",
                addresses,
                balancer="round_robin",
                health=f"{{active: {FAST_CHECKS}, {shared}}}",
            )
        ),
        workers=1,
    )
    # Node B runs no active check: all it knows of the flaky endpoint comes through Redis.
    node_b = start_gateway(
        doc(upstream("up", addresses, balancer="round_robin", health=f"{{{shared}}}")), workers=1
    )
    assert set(served_by(node_b, 10)) == {"demo", "flaky"}
    assert endpoints(node_b)[flaky.address]["down_elsewhere"] is False

    flaky.healthy = False
    flipped = time.monotonic()
    eventually(
        lambda: endpoints(node_a)[flaky.address]["healthy"] is False, 3, "node A's check failing"
    )
    # A's next probe (<= 1 s), then pub/sub or else B's 2 s poll: the bound is 5 s.
    state = eventually(
        lambda: (s := endpoints(node_b)[flaky.address])["available"] is False and s,
        5,
        "node B taking the flaky endpoint out",
    )
    print(f"\n[resilience] node B took it out {time.monotonic() - flipped:.2f}s after it failed")
    assert state["down_elsewhere"] is True, state
    assert state["healthy"] is True, state  # B itself never checked it
    assert state["last_check_error"] is None, state
    assert served_by(node_b, 20) == {"demo": 20}

    flaky.healthy = True
    flipped = time.monotonic()
    state = eventually(
        lambda: (s := endpoints(node_b)[flaky.address])["available"] is True and s,
        10,
        "node B putting the flaky endpoint back",
    )
    print(f"[resilience] node B put it back {time.monotonic() - flipped:.2f}s after it recovered")
    assert state["down_elsewhere"] is False, state
    assert set(served_by(node_b, 20)) == {"demo", "flaky"}
    for node in (node_a, node_b):
        res = node.admin("GET", "/upstreams")
        assert res.json()["shared_health_error"] is None, res.json()


# ---------------------------------------------------------------------------- 6. pools


def test_reload_keeps_pooled_connections_to_unchanged_endpoints(
    start_gateway: GatewayFactory, controlled: Callable[[str], ControlledUpstream]
) -> None:
    up = controlled("pooled")
    gw = start_gateway(doc(upstream("up", [up.address])), workers=1)

    def twenty(path: str) -> None:
        for i in range(20):
            reply = get(gw.port, f"{path}/{i}")
            assert reply.status == 200, (reply.status, reply.body)
            assert reply.json()["instance"] == "pooled"

    twenty("/api/first")
    # Sequential requests on one worker: one upstream connection, reused.
    assert (up.connections, up.requests) == (1, 20)

    extra = "  - {name: extra, match: {path_prefix: /extra}, upstream: up}\n"
    res = gw.admin("POST", "/config", content=doc(upstream("up", [up.address]), API_ROUTE + extra))
    assert res.status_code == 200, res.text
    twenty("/api/second")
    twenty("/extra")
    assert (up.connections, up.requests) == (1, 60), "a reload adding a route reconnected"

    # The upstream's settings change, the endpoint stays: its pool carries over.
    changed = upstream("up", [up.address], timeouts="{read: 5s, connect: 2s}")
    res = gw.admin("POST", "/config", content=doc(changed, API_ROUTE + extra))
    assert res.status_code == 200, res.text
    twenty("/api/third")
    assert (up.connections, up.requests) == (1, 80), "a reload changing timeouts reconnected"
    state = endpoints(gw)[up.address]
    assert (state["open_connections"], state["idle_connections"]) == (1, 1), state
    assert gw.status()["reloads"] == 2
