"""One supervised instance, in process: readiness, failures before it was ever
ready, restarts with backoff, the restart policy, and a stop that leaves nothing."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from meshgate.runner import ReadySpec, StartupError
from meshgate.runner.instance import Context, Instance, Kind, Launch, answer_summary
from meshgate.runner.logs import LogPrinter
from meshgate.runner.procs import Pid, Watchdog, command_line, group_members

pytestmark = pytest.mark.timeout(30)


CREATED: list[Instance] = []
"""Instances of the running test, stopped at its end even when it failed."""


@pytest.fixture
async def ctx(tmp_path: Path) -> AsyncIterator[Context]:
    watchdog = Watchdog()
    watchdog.start()
    console = Console(file=io.StringIO(), width=200, no_color=True)
    async with httpx.AsyncClient() as http:
        context = Context(
            printer=LogPrinter(console),
            watchdog=watchdog,
            http=http,
            logs=tmp_path,
            force=asyncio.Event(),
            changed=lambda: None,
        )
        try:
            yield context
        finally:
            for job in CREATED:
                await job.stop()
            CREATED.clear()
    watchdog.close()
    for pgid in context.pgids:
        assert group_members(pgid) == [], f"group {pgid} outlived the test"


def output(ctx: Context) -> str:
    file = ctx.printer.console.file
    assert isinstance(file, io.StringIO)
    return file.getvalue()


def python(code: str, **ready: object) -> dict[str, object]:
    """Instance settings that run ``code`` in Python."""

    def build(instance: Instance) -> Launch:
        return Launch([sys.executable, "-c", code], dict(os.environ), Path.cwd())

    return {"build": build, "ready": ReadySpec(**ready)}  # type: ignore[arg-type]


def instance(ctx: Context, name: str = "job-1", **settings: object) -> Instance:
    created = Instance(
        ctx,
        name=name,
        service=name.rsplit("-", 1)[0],
        index=1,
        kind=Kind.COMMAND,
        stop_timeout=settings.pop("stop_timeout", 5.0),  # type: ignore[arg-type]
        **settings,  # type: ignore[arg-type]
    )
    CREATED.append(created)
    return created


async def test_ready_by_a_log_line_then_stopped_with_sigterm(ctx: Context) -> None:
    job = instance(
        ctx,
        **python(
            "import time; print('warming up'); print('listening now'); time.sleep(60)", log="listen"
        ),
    )
    job.start()
    await asyncio.wait_for(job.first, 10)
    assert job.status == "ready"
    pid = job.pid
    assert pid is not None
    await job.stop()
    assert job.status == "stopped"
    assert job.exit_code == -15
    assert job.pid is None
    assert "job-1   | listening now" in output(ctx)
    assert (ctx.logs / "job-1.log").read_text().count("listening now") == 1


async def test_an_exit_before_ready_fails_with_the_last_lines(ctx: Context) -> None:
    job = instance(ctx, **python("print('bad setting: X'); raise SystemExit(3)", log="never"))
    job.start()
    with pytest.raises(StartupError) as caught:
        await asyncio.wait_for(job.first, 10)
    message = str(caught.value)
    assert message.startswith("job-1 exited with code 3; its last lines:\n")
    assert "  job-1 | bad setting: X" in message
    assert job.status == "failed"
    assert job.restarts == 0


async def test_a_readiness_timeout_kills_and_fails(ctx: Context) -> None:
    job = instance(
        ctx, **python("import time; print('stuck'); time.sleep(60)", log="x", timeout=0.5)
    )
    job.start()
    expected = (
        r"did not become ready within 0\.5 s \(services\.job\.ready\.timeout\); "
        r"it is ready when a line matches 'x'"
    )
    with pytest.raises(StartupError, match=expected):
        await asyncio.wait_for(job.first, 10)
    await job.stop()
    assert job.exit_code == -15


async def test_a_crash_after_ready_restarts_with_backoff(ctx: Context) -> None:
    marker = ctx.logs / "runs"
    code = (
        f"import pathlib, time; p = pathlib.Path({str(marker)!r}); "
        "n = len(p.read_text()) if p.exists() else 0; p.write_text('x' * (n + 1)); "
        "print('up', n, flush=True); time.sleep(0.2 if n < 2 else 60); raise SystemExit(1)"
    )
    job = instance(ctx, **python(code))  # ready as soon as it runs
    job.start()
    await asyncio.wait_for(job.first, 10)
    for _ in range(200):
        if job.restarts == 2 and job.status == "ready":
            break
        await asyncio.sleep(0.05)
    assert job.restarts == 2, output(ctx)
    text = output(ctx)
    assert "job-1   | exited with code 1; restarting in 0.5 s" in text
    assert "job-1   | exited with code 1; restarting in 1 s" in text  # doubled
    first = Pid.of(job.pid or 0)
    await job.stop()
    assert first is not None
    assert not first.alive()


@pytest.mark.parametrize(
    ("policy", "code", "status"),
    [
        ("never", 1, "exited"),
        ("on-failure", 0, "exited"),
        ("on-failure", 1, "restarting"),
        ("always", 0, "restarting"),
    ],
)
async def test_the_restart_policy(ctx: Context, policy: str, code: int, status: str) -> None:
    job = instance(
        ctx, restart=policy, **python(f"import time; time.sleep(0.2); raise SystemExit({code})")
    )
    job.start()
    await asyncio.wait_for(job.first, 10)
    for _ in range(100):
        if job.status in ("exited", "restarting"):
            break
        await asyncio.sleep(0.02)
    assert job.status == status
    await job.stop()


async def test_a_process_that_ignores_sigterm_is_killed_with_its_group(ctx: Context) -> None:
    code = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "print('ready', flush=True); time.sleep(60)"
    )
    job = instance(ctx, stop_timeout=0.5, **python(code, log="ready"))
    job.start()
    await asyncio.wait_for(job.first, 10)
    pgid = job.pid
    assert pgid is not None
    await asyncio.sleep(0.2)
    assert len(group_members(pgid)) == 2
    await job.stop()
    assert job.exit_code == -9
    assert group_members(pgid) == []
    assert "job-1   | did not stop within 0.5 s of SIGTERM; killed" in output(ctx)


async def test_a_program_that_does_not_exist(ctx: Context) -> None:
    def build(instance: Instance) -> Launch:
        return Launch(["no-such-program-x"], dict(os.environ), Path.cwd())

    job = instance(ctx, build=build, ready=ReadySpec(log="never"))
    job.start()
    with pytest.raises(StartupError, match="exited with code 127"):
        await asyncio.wait_for(job.first, 10)
    assert "cannot run 'no-such-program-x'" in output(ctx)


# ---------------------------------------------------------------------------- why not ready

NOT_READY_SERVER = """\
import http.server, json, sys
body = json.dumps({"status": "not_ready", "checks": {
    "database": {"ok": True, "latency_ms": 1.0},
    "cache": {"ok": False, "error": "Error 111 connecting to 127.0.0.1:1. Connection refused."},
}}).encode()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def on_port(
    code: str, port: int, fixed: tuple[tuple[str, int, str], ...] = (), **ready: object
) -> dict[str, object]:
    """Instance settings that run ``code`` with ``port`` as its argument; ``fixed``
    as a system file's ``port`` would make it."""

    def build(instance: Instance) -> Launch:
        argv = [sys.executable, "-c", code, str(port)]
        return Launch(argv, dict(os.environ), Path.cwd(), port, fixed)

    return {"build": build, "ready": ReadySpec(**ready)}  # type: ignore[arg-type]


async def test_a_dependency_s_error_is_shown_while_waiting_and_on_timeout(ctx: Context) -> None:
    job = instance(ctx, **on_port(NOT_READY_SERVER, free_port(), http="/health", timeout=1.5))
    job.start()
    with pytest.raises(StartupError) as caught:
        await asyncio.wait_for(job.first, 10)
    reason = (
        "GET /health answered 503: cache: Error 111 connecting to 127.0.0.1:1. Connection refused."
    )
    assert f"; the last check: {reason}; its last lines:" in str(caught.value)
    # Said once, when the reason appeared, however often it was checked.
    assert output(ctx).count(f"job-1   | not ready yet: {reason}\n") == 1


@pytest.mark.parametrize(
    ("body", "summary"),
    [
        (
            {
                "status": "not_ready",
                "checks": {"db": {"ok": True}, "cache": {"ok": False, "error": "down"}},
            },
            "cache: down",
        ),
        (
            {"type": "about:blank", "title": "Unavailable", "detail": "the cache is down"},
            "the cache is down",
        ),
        ({"status": "draining"}, "draining"),
    ],
    ids=["readiness", "problem-details", "status-only"],
)
def test_what_a_failing_answer_says(body: dict[str, object], summary: str) -> None:
    response = httpx.Response(503, content=json.dumps(body).encode())
    assert answer_summary(response) == summary


def test_a_failing_answer_that_is_not_json() -> None:
    assert (
        answer_summary(httpx.Response(502, text="<h1>Bad\n gateway</h1>")) == "<h1>Bad gateway</h1>"
    )
    assert answer_summary(httpx.Response(500, text="x" * 500), limit=10) == "x" * 10


# ---------------------------------------------------------------------------- ports of others

SLEEPER = "import sys, time; print('started on', sys.argv[1], flush=True); time.sleep(60)"


async def test_a_fixed_port_held_by_another_process_fails_the_start(ctx: Context) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        job = instance(
            ctx,
            **on_port(SLEEPER, port, tcp=True, fixed=(("127.0.0.1", port, "services.job.port"),)),
        )
        job.start()
        with pytest.raises(StartupError) as caught:
            await asyncio.wait_for(job.first, 10)
    message = str(caught.value)
    reason = (
        f"port {port} (services.job.port) is in use: Address already in use: held by "
        f"pid {os.getpid()} ({command_line(os.getpid())}); stop that process, give another "
        "port, or leave the port out for a free one"
    )
    assert message == (
        f"job-1 could not be started: {reason}; its last lines:\n  job-1 | cannot start: {reason}"
    )
    assert "started on" not in output(ctx)  # it never ran


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_a_port_answered_by_another_process_is_not_ready(ctx: Context) -> None:
    # The port was free when chosen, then another process took it: connections
    # succeed, but they reach that process, not the instance.
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        job = instance(ctx, **on_port(SLEEPER, port, tcp=True, timeout=1.0))
        job.start()
        with pytest.raises(StartupError) as caught:
            await asyncio.wait_for(job.first, 10)
    message = str(caught.value)
    assert (
        f"it is ready when its port accepts connections, on a listener of its own; the last "
        f"check: port {port} answers, but it is held by pid {os.getpid()} ("
    ) in message, message
    assert f"not by job-1; its last lines:\n  job-1 | started on {port}" in message
    assert f"job-1   | not ready yet: port {port} answers, but it is held by" in output(ctx)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_a_port_of_its_own_child_is_ready(ctx: Context) -> None:
    port = free_port()
    code = (
        "import subprocess, sys; subprocess.run([sys.executable, '-m', 'http.server', "
        "sys.argv[1], '--bind', '127.0.0.1'])"
    )
    job = instance(ctx, **on_port(code, port, http="/"))
    job.start()
    await asyncio.wait_for(job.first, 20)
    assert job.status == "ready"
