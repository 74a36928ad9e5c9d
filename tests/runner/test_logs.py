"""The merged log: lines prefixed by instance, JSON shown compactly, files merged in
time order and followed."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from meshgate.runner.logs import (
    InstanceLog,
    LogPrinter,
    follow,
    is_noise,
    log_files,
    render,
    tail_lines,
    timestamp,
)


def printer() -> tuple[LogPrinter, io.StringIO]:
    buffer = io.StringIO()
    console = Console(file=buffer, width=200, no_color=True, soft_wrap=True)
    return LogPrinter(console), buffer


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        pytest.param(
            json.dumps(
                {"ts": "x", "level": "warning", "service": "users", "message": "slow", "x": 1}
            ),
            "warning slow",
            id="record",
        ),
        pytest.param(
            json.dumps({"level": "info", "message": "hi", "request_id": "r-1"}),
            "info    hi  request_id=r-1",
            id="record-with-request-id",
        ),
        pytest.param(
            json.dumps({"level": "error", "message": "boom", "exception": "Traceback\nValueError"}),
            "error   boom\nTraceback\nValueError",
            id="record-with-exception",
        ),
        pytest.param(
            json.dumps(
                {
                    "method": "GET",
                    "path": "/api/users/1",
                    "status": 200,
                    "duration_ms": 3.25,
                    "route": "users-read",
                }
            ),
            "GET /api/users/1 200 3.2 ms  route=users-read",
            id="access-log",
        ),
        pytest.param("plain text {not json", "plain text {not json", id="plain"),
        pytest.param("\x1b[32mgreen\x1b[0m", "green", id="ansi"),
        pytest.param("[meshgate] exited with code 1", "exited with code 1", id="runner-note"),
    ],
)
def test_render(line: str, shown: str) -> None:
    assert render(line).plain == shown


def test_lines_are_prefixed_by_instance_in_one_column() -> None:
    out, buffer = printer()
    out.colour("gateway")
    out.line("users-1", "first")
    out.line("gateway", json.dumps({"level": "error", "message": "a\nb"}))
    assert buffer.getvalue().splitlines() == [
        "users-1 | first",
        "gateway | error   a",
        "gateway | b",
    ]
    assert out.colours["gateway"] != out.colours["users-1"]
    out.note("up", "gw.yaml changed but is not used:\n  routes (line 3): not valid YAML")
    assert buffer.getvalue().splitlines()[-2:] == [
        "up      | gw.yaml changed but is not used:",
        "up      |   routes (line 3): not valid YAML",
    ]


def test_httpx_request_lines_stay_out_of_the_console() -> None:
    heartbeat = json.dumps({"level": "info", "logger": "httpx", "message": "HTTP Request: PUT"})
    assert is_noise(heartbeat)
    assert not is_noise(json.dumps({"level": "warning", "logger": "httpx", "message": "x"}))
    assert not is_noise("httpx says hi")
    out, buffer = printer()
    out.line("users-1", heartbeat)
    assert buffer.getvalue() == ""
    out.line("users-1", heartbeat, raw=True)
    assert "HTTP Request" in buffer.getvalue()


def test_files_merge_in_time_order_and_select_by_service(tmp_path: Path) -> None:
    lines = {
        "users-1": ["2025-01-01T00:00:00.100Z a", "2025-01-01T00:00:00.300Z c"],
        "users-2": ["2025-01-01T00:00:00.200Z b", "2025-01-01T00:00:00.400Z d"],
        "users-migrate": ["2025-01-01T00:00:00.050Z m"],
        "users-admin-1": ["2025-01-01T00:00:00.000Z other service"],
        "gateway": ["2025-01-01T00:00:00.000Z g"],
    }
    for name, content in lines.items():
        (tmp_path / f"{name}.log").write_text("\n".join(content) + "\n")
    users = log_files(tmp_path, "users")
    assert [p.stem for p in users] == ["users-1", "users-2", "users-migrate"]
    assert [p.stem for p in log_files(tmp_path, "users-2")] == ["users-2"]
    assert len(log_files(tmp_path, None)) == 5
    merged = tail_lines(users, 10)
    assert [(name, text) for _, name, text in merged] == [
        ("users-migrate", "m"),
        ("users-1", "a"),
        ("users-2", "b"),
        ("users-1", "c"),
        ("users-2", "d"),
    ]
    assert [text for _, _, text in tail_lines(users, 2)] == ["c", "d"]
    assert tail_lines(users, 0) == []


def test_instance_log_writes_timestamped_lines(tmp_path: Path) -> None:
    log = InstanceLog(tmp_path / "web-1.log")
    log.write("hello")
    log.event("exited with code 1")
    log.close()
    log.write("after close is ignored")
    first, second = (tmp_path / "web-1.log").read_text().splitlines()
    assert first[:4].isdigit()
    assert first.endswith(" hello")
    assert second.endswith(" [meshgate] exited with code 1")
    assert len(timestamp(0)) == len("1970-01-01T00:00:00.000Z")


def test_follow_prints_new_lines_of_new_files_too(tmp_path: Path) -> None:
    (tmp_path / "users-1.log").write_text("2025-01-01T00:00:00.000Z old\n")
    seen: list[tuple[str, str]] = []
    done = threading.Event()
    thread = threading.Thread(
        target=follow,
        args=(lambda: log_files(tmp_path, "users"), lambda n, t: seen.append((n, t)), done.is_set),
        kwargs={"interval": 0.02},
    )
    thread.start()
    try:
        time.sleep(0.1)
        with (tmp_path / "users-1.log").open("a") as out:
            out.write("2025-01-01T00:00:01.000Z new\n2025-01-01T00:00:01.100Z part")
        (tmp_path / "users-2.log").write_text("2025-01-01T00:00:02.000Z from a new instance\n")
        deadline = time.monotonic() + 5
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        with (tmp_path / "users-1.log").open("a") as out:
            out.write("ial\n")
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        done.set()
        thread.join(5)
    assert ("users-1", "old") not in seen
    assert seen == [
        ("users-1", "new"),
        ("users-2", "from a new instance"),
        ("users-1", "partial"),
    ]
