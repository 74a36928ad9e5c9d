"""Fixtures for end-to-end tests: real ``meshgate gateway`` processes on loopback.

Each gateway runs as ``python -m meshgate gateway`` with its own config file, log
files and ephemeral ports. Teardown stops it with SIGTERM and then checks, by PID,
that no process it started (workers, the multiprocessing resource tracker)
outlived it: a leaked worker keeps serving the port, so it fails the test.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import free_port, gateway_yaml

TOKEN = "e2e-admin-token-0123456789"
"""The admin token of gateways started with :func:`gateway_config`."""

READY_TIMEOUT = 20.0
"""How long a gateway may take to print its ready line (spawning workers is slow
on two cores, and slower still under coverage)."""

DEFAULT_ROUTES = "  - {name: api, match: {path_prefix: /api}, upstream: up, strip_prefix: true}\n"
"""``/api/...`` goes to the upstream as ``/...`` (so ``/api/delay/1`` is the demo's delay)."""

_READY_RE = re.compile(
    r"gateway on https?://127\.0\.0\.1:(?P<port>\d+) \((?P<workers>\d+) workers?\); "
    r"admin on https?://127\.0\.0\.1:(?P<admin>\d+)"
)
_TOKEN_RE = re.compile(r"admin token in (?P<path>\S+)")


def gateway_config(
    upstream: str, routes: str | None = None, *, drain_timeout: float = 5.0, admin: str = ""
) -> str:
    """A gateway config: one upstream ``up`` at ``upstream``, an admin listener on an
    ephemeral port with :data:`TOKEN` (unless ``admin`` says otherwise), no access log."""
    admin = admin or f"{{listen: '127.0.0.1:0', token: '{TOKEN}'}}"
    return gateway_yaml(
        {"up": [upstream]},
        routes if routes is not None else DEFAULT_ROUTES,
        f"admin: {admin}\ndrain_timeout: {drain_timeout}",
    )


# ---------------------------------------------------------------------------- processes


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of ``pid`` from /proc, or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces and parentheses; the fields follow the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


@dataclass(frozen=True)
class Pid:
    """A process identified by PID and start time, so that a reused PID is not mistaken
    for the original process."""

    pid: int
    started: int

    @classmethod
    def of(cls, pid: int) -> Pid | None:
        stat = _stat(pid)
        return None if stat is None else cls(pid, stat[1])

    def alive(self) -> bool:
        """Running (a zombie is dead: it only waits for its parent to reap it)."""
        stat = _stat(self.pid)
        return stat is not None and stat[1] == self.started and stat[0] not in ("Z", "X")


def children(pid: int) -> list[Pid]:
    """The live child processes of ``pid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            found.append(Pid(int(entry.name), int(fields[19])))
    return found


def wait_dead(pids: list[Pid], timeout: float) -> list[Pid]:
    """Wait up to ``timeout`` for every process to exit; return those still alive."""
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if p.alive()]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if p.alive()]
    return alive


def refuses_connections(port: int) -> bool:
    """True if nothing accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no output)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


@dataclass
class Gateway:
    """A running ``meshgate gateway`` process and how to reach it."""

    proc: subprocess.Popen[bytes]
    config_path: Path
    stdout_path: Path
    stderr_path: Path
    port: int
    admin_port: int
    token: str
    workers: int
    ready_line: str
    known: set[Pid] = field(default_factory=set)
    """Every worker and helper process seen so far, checked at teardown."""

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def log(self) -> str:
        """The tail of the gateway's stderr, for assertion messages."""
        return tail(self.stderr_path)

    def admin(
        self, method: str, path: str, *, token: str | None = "", **kwargs: Any
    ) -> httpx.Response:
        """An admin API request; ``token=""`` sends the right token, None sends none."""
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token or self.token}"
        return httpx.request(method, self.admin_url + path, headers=headers, timeout=10, **kwargs)

    def status(self) -> dict[str, Any]:
        """GET /status; remembers the worker PIDs it lists for the teardown check."""
        res = self.admin("GET", "/status")
        assert res.status_code == 200, res.text
        data: dict[str, Any] = res.json()
        self.remember(w["pid"] for w in data["workers"] if w["alive"])
        return data

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.status()["workers"]]

    def remember(self, pids: Any) -> None:
        for pid in pids:
            found = Pid.of(pid)
            if found is not None:
                self.known.add(found)

    def snapshot_children(self) -> None:
        """Remember the supervisor's current children (workers, resource tracker)."""
        self.known.update(children(self.pid))

    def write_config(self, text: str) -> None:
        self.config_path.write_text(text, encoding="utf-8")

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)


GatewayFactory = Callable[..., Gateway]


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[GatewayFactory]:
    """Start ``meshgate gateway`` on a config text; stopped and checked at teardown.

    Call it as ``start_gateway(config_text, workers=2)``; it returns once the
    gateway printed its ready line, or fails the test with the log tail.
    """
    started: list[Gateway] = []

    def start(config: str, *, workers: int = 2, token: str | None = TOKEN) -> Gateway:
        n = len(started)
        config_path = tmp_path / f"gateway-{n}.yaml"
        config_path.write_text(config, encoding="utf-8")
        stdout_path = tmp_path / f"gateway-{n}.stdout"
        stderr_path = tmp_path / f"gateway-{n}.stderr"
        # HOME in tmp_path: a default admin token file never lands in the real home.
        env = {**os.environ, "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "meshgate",
                    "gateway",
                    str(config_path),
                    "--workers",
                    str(workers),
                    "--log-level",
                    "info",
                ],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=tmp_path,
            )
        gw = Gateway(proc, config_path, stdout_path, stderr_path, 0, 0, "", workers, "")
        started.append(gw)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            text = stderr_path.read_text(errors="replace")
            match = _READY_RE.search(text)
            if match is not None:
                break
            if proc.poll() is not None:
                pytest.fail(f"gateway exited with {proc.returncode} before it was ready:\n{text}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"gateway not ready within {READY_TIMEOUT:g}s; its log:\n{tail(stderr_path)}"
                )
            time.sleep(0.05)
        gw.port = int(match["port"])
        gw.admin_port = int(match["admin"])
        gw.ready_line = match.group(0)
        assert int(match["workers"]) == workers, text
        if token is None:
            # The token line follows the ready line; give it a moment to be written.
            while (found := _TOKEN_RE.search(stderr_path.read_text())) is None:
                if time.monotonic() > deadline:
                    pytest.fail(f"no 'admin token in' line:\n{tail(stderr_path)}")
                time.sleep(0.05)
            gw.token = Path(found["path"]).read_text().strip()
        else:
            gw.token = token
        gw.snapshot_children()
        return gw

    yield start

    problems = [problem for gw in started if (problem := _stop(gw))]
    if problems:
        pytest.fail("\n\n".join(problems))


def _stop(gw: Gateway) -> str | None:
    """Stop ``gw`` with SIGTERM (SIGKILL if it hangs); describe anything left behind."""
    problems = []
    if gw.proc.poll() is None:
        gw.snapshot_children()
        with contextlib.suppress(httpx.HTTPError, AssertionError):
            gw.status()
        gw.proc.send_signal(signal.SIGTERM)
        try:
            gw.proc.wait(30)
        except subprocess.TimeoutExpired:
            gw.proc.kill()
            gw.proc.wait(10)
            problems.append(f"supervisor {gw.pid} ignored SIGTERM for 30s; killed it")
    leftovers = wait_dead(sorted(gw.known, key=lambda p: p.pid), 10)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid.pid, signal.SIGKILL)
    if leftovers:
        problems.append(
            f"processes of gateway {gw.pid} still alive 10s after it exited: "
            f"{[p.pid for p in leftovers]}"
        )
    if problems:
        problems.append(f"gateway log:\n{gw.log()}")
        return "\n".join(problems)
    return None


# ---------------------------------------------------------------------------- upstream


@dataclass(frozen=True)
class DemoUpstream:
    """A ``meshgate demo-upstream`` process."""

    name: str
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="session")
def demo_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoUpstream]:
    """One demo upstream (answers as ``demo``) for the whole session; it keeps no state."""
    log_path = tmp_path_factory.mktemp("demo-upstream") / "stderr"
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
                    "demo",
                ],
                stdout=subprocess.DEVNULL,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            if "demo upstream" in log_path.read_text(errors="replace"):
                break
            time.sleep(0.05)
        if proc.poll() is None and not refuses_connections(port):
            break
        proc.kill()
        proc.wait(10)
    else:
        pytest.fail(f"the demo upstream did not start:\n{tail(log_path)}")
    try:
        yield DemoUpstream("demo", port)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
