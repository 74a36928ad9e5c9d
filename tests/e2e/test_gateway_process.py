"""``meshgate gateway`` as a real process: workers, restarts, draining, admin API,
reloads and startup errors, over loopback with ephemeral ports."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from tests.e2e.conftest import (
    TOKEN,
    DemoUpstream,
    GatewayFactory,
    Pid,
    gateway_config,
    refuses_connections,
    wait_dead,
)

pytestmark = pytest.mark.e2e

API_ROUTE = "  - {name: api, match: {path_prefix: /api}, upstream: up, strip_prefix: true}\n"
V2_ROUTE = "  - {name: v2, match: {path_prefix: /v2}, upstream: up, strip_prefix: true}\n"


class Reply:
    """One HTTP response, read whole."""

    def __init__(self, res: http.client.HTTPResponse) -> None:
        self.status = res.status
        self.headers = {k.lower(): v for k, v in res.getheaders()}
        self.body = res.read()

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def worker(self) -> str:
        """Which worker answered: request ids start with a per-worker random prefix."""
        return self.headers["x-request-id"][:16]


def get(port: int, path: str, *, timeout: float = 10) -> Reply:
    """GET ``path`` on a new connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return Reply(conn.getresponse())
    finally:
        conn.close()


def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Call ``check`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.05)
    pytest.fail(f"{what} not within {timeout:g}s (last: {last!r})")


def requests_total(text: str, route: str) -> int:
    """The sum over status classes of ``meshgate_gateway_requests_total`` for ``route``."""
    total = 0.0
    pattern = re.compile(r"^meshgate_gateway_requests_total\{(?P<labels>[^}]*)\} (?P<v>\S+)$")
    for line in text.splitlines():
        match = pattern.match(line)
        if match is not None and f'route="{route}"' in match["labels"]:
            total += float(match["v"])
    return int(total)


def active_upstream_connections(text: str) -> int:
    """The sum of ``meshgate_gateway_upstream_connections{state="active"}``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("meshgate_gateway_upstream_connections{") and ('state="active"' in line):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


# ---------------------------------------------------------------------------- workers


def test_two_workers_serve_and_metrics_sum_across_them(
    start_gateway: GatewayFactory, demo_upstream: DemoUpstream
) -> None:
    gw = start_gateway(gateway_config(demo_upstream.address), workers=2)
    workers = gw.status()["workers"]
    assert [w["index"] for w in workers] == [0, 1]
    assert all(w["alive"] and w["restarts"] == 0 for w in workers), workers
    assert len({w["pid"] for w in workers}) == 2, workers
    assert gw.pid not in {w["pid"] for w in workers}

    # SO_REUSEPORT spreads connections by hash of the client port: 30 connections
    # all landing on one of two workers has a probability of about 2e-9.
    connections, per_connection = 30, 3
    served_by = set()
    for _ in range(connections):
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
        for i in range(per_connection):
            conn.request("GET", f"/api/items/{i}")
            reply = Reply(conn.getresponse())
            assert reply.status == 200, reply.body
            assert reply.json()["path"] == f"/items/{i}"
            served_by.add(reply.worker)
        conn.close()
    assert len(served_by) == 2, f"every request was served by one worker: {served_by}"

    sent = connections * per_connection

    def counted() -> int:
        res = gw.admin("GET", "/metrics")
        assert res.status_code == 200, res.text
        return requests_total(res.text, "api")

    # A worker counts an exchange as it finishes it; give the last ones a moment.
    eventually(lambda: counted() >= sent, 5, f"{sent} requests counted")
    assert counted() == sent


def test_killed_worker_is_restarted_and_traffic_continues(
    start_gateway: GatewayFactory, demo_upstream: DemoUpstream
) -> None:
    gw = start_gateway(gateway_config(demo_upstream.address), workers=2)
    before = gw.status()["workers"]
    victim = before[0]["pid"]
    victim_proc = Pid.of(victim)
    assert victim_proc is not None
    survivor = before[1]["pid"]
    # Learn both workers' request-id prefixes, to recognize the restarted worker by its new one.
    workers_seen: set[str] = set()
    for _ in range(200):
        workers_seen.add(get(gw.port, "/api/warmup").worker)
        if len(workers_seen) == 2:
            break
    assert len(workers_seen) == 2, "200 connections all went to one worker"

    def counted() -> int:
        res = gw.admin("GET", "/metrics")
        assert res.status_code == 200, res.text
        return requests_total(res.text, "api")

    for i in range(40):  # the victim counts about half of these
        assert get(gw.port, f"/api/before/{i}").status == 200
    eventually(lambda: counted() >= 42, 5, "the requests before the kill counted")
    counted_before_kill = counted()

    signal_time = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    assert wait_dead([victim_proc], 5) == [], "SIGKILL did not kill the worker"

    # Until the restarted worker serves, a connection that the kernel had queued on
    # the dead worker's listener may be reset: that is the accepted restart window.
    errors: list[str] = []
    new_workers: set[str] = set()
    served_since_kill = 0
    deadline = signal_time + 10
    while time.monotonic() < deadline:
        try:
            reply = get(gw.port, "/api/during-restart", timeout=5)
        except (ConnectionError, http.client.RemoteDisconnected) as exc:
            errors.append(repr(exc))
            continue
        assert reply.status == 200, reply.body
        served_since_kill += 1
        if reply.worker not in workers_seen:
            new_workers.add(reply.worker)
            break
    assert new_workers, (
        f"no request was served by a new worker within 10s of the kill; errors: {errors}\n"
        + gw.log()
    )
    assert len(errors) <= 2, errors

    workers = gw.status()["workers"]
    assert workers[0]["pid"] != victim
    assert workers[0]["alive"] is True
    assert workers[0]["restarts"] == 1
    assert workers[0]["exit_codes"] == [-9]
    assert workers[1] == {
        "index": 1,
        "pid": survivor,
        "alive": True,
        "restarts": 0,
        "exit_codes": [],
    }
    # After the restart window every request succeeds.
    for i in range(30):
        reply = get(gw.port, f"/api/after/{i}")
        assert reply.status == 200, reply.body
    assert f"worker 0 (pid {victim}) exited with code -9" in gw.log()
    # The dead worker's share stays in the merged counter: it never goes down.
    served_since_kill += 30
    eventually(
        lambda: counted() >= counted_before_kill + served_since_kill,
        5,
        f"{counted_before_kill} + {served_since_kill} requests counted",
    )


# ---------------------------------------------------------------------------- stopping


def test_sigterm_drains_in_flight_requests_then_exits_0(
    start_gateway: GatewayFactory, demo_upstream: DemoUpstream
) -> None:
    drain_timeout = 5.0
    gw = start_gateway(
        gateway_config(demo_upstream.address, drain_timeout=drain_timeout), workers=2
    )
    worker_procs = [Pid.of(pid) for pid in gw.worker_pids()]
    result: dict[str, Any] = {}

    def slow_request() -> None:
        try:
            result["reply"] = get(gw.port, "/api/delay/1.5")
        except Exception as exc:
            result["error"] = exc

    client = threading.Thread(target=slow_request)
    started = time.monotonic()
    client.start()
    # Signal once the request is surely in flight: forwarded, its upstream connection busy.
    eventually(
        lambda: active_upstream_connections(gw.admin("GET", "/metrics").text) == 1,
        5,
        "the slow request forwarded upstream",
    )
    time.sleep(max(0.0, started + 0.3 - time.monotonic()))
    sigterm_at = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    # Draining workers stop accepting at once, while the slow request is still in flight.
    eventually(lambda: refuses_connections(gw.port), 1.0, "new connections refused")
    assert client.is_alive(), "the slow request finished before the drain was observed"

    code = gw.wait_exit(drain_timeout + 5)
    exited_after = time.monotonic() - sigterm_at
    client.join(10)
    assert code == 0, gw.log()
    assert "error" not in result, result
    reply: Reply = result["reply"]
    assert reply.status == 200
    assert len(reply.body) == int(reply.headers["content-length"])
    assert reply.json()["path"] == "/delay/1.5"
    assert reply.headers.get("connection") == "close"
    # It waited for the request (about 1.2s left) but not for the whole drain timeout.
    assert 1.0 < exited_after < drain_timeout, exited_after
    assert refuses_connections(gw.port)
    assert wait_dead([p for p in worker_procs if p is not None], 2) == []


def test_workers_exit_when_the_supervisor_is_killed(
    start_gateway: GatewayFactory, demo_upstream: DemoUpstream
) -> None:
    gw = start_gateway(gateway_config(demo_upstream.address), workers=2)
    assert get(gw.port, "/api/x").status == 200
    procs = [Pid.of(pid) for pid in gw.worker_pids()]
    assert all(p is not None and p.alive() for p in procs)
    gw.snapshot_children()

    gw.proc.kill()
    assert gw.wait_exit(5) == -signal.SIGKILL
    alive = wait_dead([p for p in procs if p is not None], 5)
    assert alive == [], f"workers {[p.pid for p in alive]} outlived their supervisor"
    assert refuses_connections(gw.port)


# ---------------------------------------------------------------------------- admin API


ADMIN_ENDPOINTS = [
    ("GET", "/status"),
    ("GET", "/metrics"),
    ("GET", "/config"),
    ("POST", "/config/validate"),
    ("POST", "/config"),
    ("POST", "/reload"),
]


def test_admin_api_requires_the_token(
    start_gateway: GatewayFactory, demo_upstream: DemoUpstream
) -> None:
    gw = start_gateway(gateway_config(demo_upstream.address), workers=1)
    body = gateway_config(demo_upstream.address, API_ROUTE + V2_ROUTE)
    for method, path in ADMIN_ENDPOINTS:
        for token, headers in [
            (None, {}),
            ("wrong-token-0123456789", {}),
            (None, {"Authorization": f"Basic {TOKEN}"}),
            (None, {"Authorization": "Bearer"}),
        ]:
            res = gw.admin(method, path, token=token, headers=headers, content=body)
            assert res.status_code == 401, (method, path, token, headers, res.text)
            assert res.headers["www-authenticate"] == 'Bearer realm="meshgate-admin"'
            assert res.headers["content-type"] == "application/problem+json"
            assert res.json()["type"] == "https://meshgate.dev/problems/unauthorized"
            assert res.json()["instance"] == path
            assert "Authorization: Bearer" in res.json()["detail"]
    # None of the refused requests changed anything.
    status = gw.status()
    assert status["reloads"] == 0
    assert status["last_reload_error"] is None
    assert get(gw.port, "/v2/x").status == 404

    for method, path in (("GET", "/status"), ("GET", "/metrics"), ("GET", "/config")):
        res = gw.admin(method, path)
        assert res.status_code == 200, (path, res.text)
    res = gw.admin("GET", "/status", token=None, headers={"Authorization": f"bearer {TOKEN}"})
    assert res.status_code == 200, "the auth scheme is case-insensitive (RFC 9110)"


def test_admin_apply_validates_and_swaps_the_config(
    start_gateway: GatewayFactory, demo_upstream: DemoUpstream
) -> None:
    up = demo_upstream.address
    gw = start_gateway(gateway_config(up), workers=2)
    assert get(gw.port, "/v2/users").status == 404

    bad = gateway_config(up, API_ROUTE.replace("upstream: up", "upstream: nope"))
    res = gw.admin("POST", "/config/validate", content=bad)
    assert res.status_code == 400, res.text
    assert res.headers["content-type"] == "application/problem+json"
    assert res.json()["ok"] is False
    assert res.json()["type"] == "https://meshgate.dev/problems/invalid_config"
    assert (res.json()["status"], res.json()["error"]) == (400, "invalid_config")
    assert "routes[0].upstream" in res.json()["detail"]
    assert "no upstream named 'nope'" in res.json()["detail"]
    assert any(i.startswith("routes[0].upstream (line ") for i in res.json()["issues"])

    res = gw.admin("POST", "/config", content=bad)
    assert res.status_code == 400, res.text
    assert res.headers["content-type"] == "application/problem+json"
    assert res.json()["ok"] is False
    assert "routes[0].upstream" in res.json()["detail"]
    status = gw.status()
    assert status["reloads"] == 0
    assert "routes[0].upstream" in status["last_reload_error"]
    assert get(gw.port, "/api/still").status == 200
    assert get(gw.port, "/v2/users").status == 404

    moved = gateway_config(up).replace("listen: 127.0.0.1:0", "listen: 127.0.0.1:1", 1)
    res = gw.admin("POST", "/config", content=moved)
    assert res.status_code == 400, res.text
    assert "gateway.listen cannot change" in res.json()["detail"]

    good = gateway_config(up, API_ROUTE + V2_ROUTE)
    res = gw.admin("POST", "/config/validate", content=good)
    assert (res.status_code, res.json()) == (200, {"ok": True})
    assert gw.status()["reloads"] == 0, "validating must not apply"

    res = gw.admin("POST", "/config", content=good)
    assert res.status_code == 200, res.text
    assert res.json() == {"ok": True, "reloads": 1, "restart_required": []}
    # Every worker has the new route: try it over many connections.
    for i in range(20):
        reply = get(gw.port, f"/v2/users/{i}")
        assert reply.status == 200, reply.body
        assert reply.json()["path"] == f"/users/{i}"  # strip_prefix of the new route
    assert get(gw.port, "/api/still").status == 200
    status = gw.status()
    assert status["reloads"] == 1
    assert status["last_reload_error"] is None
    assert [r["name"] for r in gw.admin("GET", "/config").json()["routes"]] == ["api", "v2"]


def test_sighup_reloads_the_file_and_keeps_the_old_config_when_invalid(
    start_gateway: GatewayFactory, demo_upstream: DemoUpstream
) -> None:
    up = demo_upstream.address
    gw = start_gateway(gateway_config(up), workers=2)
    assert get(gw.port, "/v2/a").status == 404

    gw.write_config(gateway_config(up, API_ROUTE + V2_ROUTE))
    gw.proc.send_signal(signal.SIGHUP)
    eventually(lambda: gw.status()["reloads"] == 1, 10, "reloads == 1 after SIGHUP")
    for i in range(20):
        reply = get(gw.port, f"/v2/a/{i}")
        assert reply.status == 200, reply.body
        assert reply.json()["path"] == f"/a/{i}"

    gw.write_config(
        gateway_config(up, API_ROUTE + V2_ROUTE).replace(
            "drain_timeout: 5.0", "drain_timeout: soon"
        )
    )
    gw.proc.send_signal(signal.SIGHUP)
    error = eventually(
        lambda: gw.status()["last_reload_error"], 10, "last_reload_error after SIGHUP"
    )
    assert "gateway.drain_timeout" in error
    assert "'soon' is not a duration" in error
    assert str(gw.config_path) in error
    status = gw.status()
    assert status["reloads"] == 1
    assert all(w["alive"] and w["restarts"] == 0 for w in status["workers"])
    assert get(gw.port, "/v2/a").status == 200
    assert get(gw.port, "/api/b").status == 200
    assert gw.proc.poll() is None


def test_generated_admin_token_is_written_to_a_private_file(
    start_gateway: GatewayFactory, demo_upstream: DemoUpstream, tmp_path: Path
) -> None:
    token_file = tmp_path / "tok"
    gw = start_gateway(
        gateway_config(
            demo_upstream.address, admin=f"{{listen: '127.0.0.1:0', token_file: '{token_file}'}}"
        ),
        workers=1,
        token=None,
    )
    assert f"admin token in {token_file}" in gw.stderr_path.read_text()
    mode = stat.S_IMODE(token_file.stat().st_mode)
    assert mode == 0o600, oct(mode)
    token = token_file.read_text().strip()
    assert len(token) >= 32
    assert gw.admin("GET", "/status", token=token).status_code == 200
    assert gw.admin("GET", "/status", token=None).status_code == 401
    assert gw.admin("GET", "/status", token=TOKEN).status_code == 401


def test_admin_api_over_tls(
    start_gateway: GatewayFactory, demo_upstream: DemoUpstream, tmp_path: Path
) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key, ca_file = tmp_path / "admin.pem", tmp_path / "admin.key", tmp_path / "ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    admin = f"{{listen: '127.0.0.1:0', token: '{TOKEN}', tls: {{cert: '{cert}', key: '{key}'}}}}"
    gw = start_gateway(gateway_config(demo_upstream.address, admin=admin), workers=1)
    assert f"admin on https://127.0.0.1:{gw.admin_port}" in gw.ready_line
    url = f"https://127.0.0.1:{gw.admin_port}/status"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    res = httpx.get(url, headers=auth, verify=ssl.create_default_context(cafile=ca_file))
    assert res.status_code == 200, res.text
    assert res.json()["workers"]
    assert httpx.get(url, verify=ssl.create_default_context(cafile=ca_file)).status_code == 401
    # Plain HTTP on the TLS port gets no admin answer.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{gw.admin_port}/status", headers=auth, timeout=5)
    # TLS 1.1 is refused.
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(cafile=ca_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((httpx.ConnectError, ssl.SSLError)):
        httpx.get(url, headers=auth, verify=old)


def test_config_endpoint_masks_passwords(
    start_gateway: GatewayFactory, demo_upstream: DemoUpstream
) -> None:
    config = gateway_config(demo_upstream.address).replace(
        f"endpoints: ['{demo_upstream.address}']",
        f"endpoints: ['{demo_upstream.address}'], "
        "health: {shared: {redis: 'redis://:hunter2-secret@127.0.0.1:1/0'}}",
    )
    assert "hunter2" in config
    gw = start_gateway(config, workers=1)
    res = gw.admin("GET", "/config")
    assert res.status_code == 200, res.text
    assert "hunter2" not in res.text
    shared = res.json()["upstreams"]["up"]["health"]["shared"]
    assert shared["redis"] == "redis://:***@127.0.0.1:1/0"
    assert "hunter2" not in gw.stderr_path.read_text()


def test_admin_on_a_remote_address_needs_tls(tmp_path: Path) -> None:
    config = gateway_config("127.0.0.1:1", admin="{listen: '0.0.0.0:0'}")
    proc, _ = run_gateway_expecting_failure(config, tmp_path)
    assert proc.returncode != 0
    assert "gateway.admin" in proc.stderr
    assert "give it a certificate (tls: {cert, key})" in proc.stderr


def test_admin_tls_with_a_missing_key_fails_clearly(
    tmp_path: Path, demo_upstream: DemoUpstream
) -> None:
    ca = trustme.CA()
    cert = tmp_path / "admin.pem"
    ca.issue_cert("127.0.0.1").cert_chain_pems[0].write_to_path(str(cert))
    missing = tmp_path / "nope.key"
    admin = (
        f"{{listen: '127.0.0.1:0', token: '{TOKEN}', tls: {{cert: '{cert}', key: '{missing}'}}}}"
    )
    proc, _ = run_gateway_expecting_failure(
        gateway_config(demo_upstream.address, admin=admin), tmp_path
    )
    assert proc.returncode != 0
    assert "gateway.admin.tls.key" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------- startup errors


def run_gateway_expecting_failure(
    config: str, tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], float]:
    path = tmp_path / "gateway.yaml"
    path.write_text(config, encoding="utf-8")
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "meshgate", "gateway", str(path), "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    return proc, time.monotonic() - started


def test_config_error_at_startup_exits_1_naming_the_field(
    demo_upstream: DemoUpstream, tmp_path: Path
) -> None:
    config = gateway_config(demo_upstream.address).replace("drain_timeout:", "drain_timout:")
    proc, took = run_gateway_expecting_failure(config, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert took < 10
    assert "gateway.drain_timout (line " in proc.stderr
    assert "unknown key 'drain_timout' (did you mean 'drain_timeout'?)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "gateway on" not in proc.stderr


@pytest.mark.parametrize("which", ["gateway.listen", "gateway.admin.listen"])
def test_address_in_use_at_startup_exits_1_naming_the_address(
    which: str, demo_upstream: DemoUpstream, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = gateway_config(demo_upstream.address)
        if which == "gateway.listen":
            config = config.replace("listen: 127.0.0.1:0", f"listen: 127.0.0.1:{port}", 1)
        else:
            config = config.replace("listen: '127.0.0.1:0'", f"listen: '127.0.0.1:{port}'", 1)
        assert f"127.0.0.1:{port}" in config
        proc, took = run_gateway_expecting_failure(config, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert took < 10
    assert (
        f"cannot listen on {'gateway.admin.listen ' if 'admin' in which else ''}127.0.0.1:{port}"
        in proc.stderr
    )
    assert "Address already in use" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "gateway on" not in proc.stderr


def test_second_gateway_on_the_same_address_is_refused(
    start_gateway: GatewayFactory, demo_upstream: DemoUpstream, tmp_path: Path
) -> None:
    # SO_REUSEPORT would let a second gateway share the port and take half the
    # traffic; the supervisor's exclusive probe bind refuses it instead.
    first = start_gateway(gateway_config(demo_upstream.address), workers=1)
    config = gateway_config(demo_upstream.address).replace(
        "listen: 127.0.0.1:0", f"listen: 127.0.0.1:{first.port}", 1
    )
    proc, _ = run_gateway_expecting_failure(config, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert f"cannot listen on 127.0.0.1:{first.port}" in proc.stderr
    assert get(first.port, "/api/still-mine").status == 200


def test_reload_reports_settings_that_need_a_restart(
    start_gateway: GatewayFactory, demo_upstream: DemoUpstream
) -> None:
    gw = start_gateway(gateway_config(demo_upstream.address), workers=1)
    changed = gateway_config(demo_upstream.address).replace(
        "drain_timeout: 5.0", "drain_timeout: 5.0\n  workers: 3", 1
    )
    res = gw.admin("POST", "/config", content=changed)
    assert res.status_code == 200, res.text
    assert res.json()["restart_required"] == ["gateway.workers"]
    assert gw.status()["restart_required"] == ["gateway.workers"]
    assert len(gw.status()["workers"]) == 1
