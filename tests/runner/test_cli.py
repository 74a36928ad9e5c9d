"""``meshgate up``, ``ps``, ``logs``, ``scale`` and ``down`` without a running system:
bad input gets a message that says what to do, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meshgate.cli import app
from meshgate.runner import StateDir
from meshgate.runner.procs import Pid


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.delenv("MESHGATE_FILE", raising=False)
    return CliRunner()


def test_up_of_a_bad_system_file_lists_every_problem(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "meshgate.yaml"
    path.write_text("services:\n  users:\n    app: x:y\n    replica: 2\n  web: {}\n")
    result = runner.invoke(app, ["up", str(path)])
    assert result.exit_code == 1
    assert result.stdout == ""
    # Checks across fields (web has nothing to run) come once every field is valid.
    assert result.stderr.splitlines() == [
        f"{path}: 1 problem in the configuration",
        (
            "  services.users.replica (line 4): unknown key 'replica' (did you mean 'replicas'?); "
            "allowed keys: app, broker, cache, command, database, depends_on, env, env_prefix, "
            "log_level, migrate, port, ready, registry, replicas, restart, stop_timeout"
        ),
    ]
    path.write_text("services:\n  users:\n    app: x:y\n  web: {}\n")
    result = runner.invoke(app, ["up", str(path)])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[1:] == [
        (
            "  services.web (line 4): nothing to run: give app (module:attribute of a meshgate "
            "Service) or command (a program, with {port} where it should listen)"
        )
    ]
    assert "Traceback" not in result.output


def test_up_without_a_file_in_the_folder(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["up"])
    assert result.exit_code == 1
    assert "no such file" in result.stderr
    assert "write a meshgate.yaml (see docs/up.md)" in result.stderr


def test_up_refuses_a_system_that_already_runs(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "meshgate.yaml").write_text("")
    state = StateDir(tmp_path / ".meshgate")
    state.acquire()
    state.write_state({"pid": 4321})
    try:
        result = runner.invoke(app, ["up", str(tmp_path / "meshgate.yaml")])
    finally:
        state.release()
    assert result.exit_code == 1
    assert "error: this system is already running (meshgate up, pid 4321)" in result.stderr
    assert "meshgate down" in result.stderr


@pytest.mark.parametrize("command", [["ps"], ["scale", "users=2"]])
def test_asking_a_system_that_does_not_run(
    runner: CliRunner, tmp_path: Path, command: list[str]
) -> None:
    result = runner.invoke(app, [*command, "--file", str(tmp_path / "meshgate.yaml")])
    assert result.exit_code == 1
    assert f"nothing runs from {tmp_path / '.meshgate'}" in result.stderr
    assert "start it with meshgate up, or give --file" in result.stderr


@pytest.mark.parametrize("bad", ["users", "users=", "=3", "users=-1", "users=two"])
def test_scale_arguments(runner: CliRunner, tmp_path: Path, bad: str) -> None:
    result = runner.invoke(app, ["scale", bad, "--file", str(tmp_path / "x.yaml")])
    assert result.exit_code == 2
    assert "write SERVICE=N, such as users=3" in result.stderr


def test_down_when_nothing_runs(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["down", "-f", str(tmp_path / "meshgate.yaml")])
    assert result.exit_code == 0
    assert result.stdout == f"nothing runs from {tmp_path / '.meshgate'}\n"


def test_down_stops_what_a_dead_runner_left(runner: CliRunner, tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    ) as orphan:
        pid = Pid.of(orphan.pid)
        assert pid is not None
        state = StateDir(tmp_path / ".meshgate")
        state.prepare()
        state.record_pids({"users-1": pid})
        result = runner.invoke(app, ["down", "--file", str(tmp_path / "meshgate.yaml")])
        assert result.exit_code == 0, result.output
        assert "stopped users-1" in result.stdout
        assert orphan.wait(10) == -15
    assert state.recorded_pids() == {}


def test_logs_of_a_system_that_stopped(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = StateDir(tmp_path / ".meshgate")
    state.prepare()
    state.log_file("users-1").write_text(
        '2025-01-01T00:00:00.100Z {"level": "info", "message": "started"}\n'
        "2025-01-01T00:00:00.300Z [meshgate] was killed by SIGKILL; restarting in 0.5 s\n"
    )
    state.log_file("users-2").write_text("2025-01-01T00:00:00.200Z plain line\n")
    state.log_file("web-1").write_text("2025-01-01T00:00:00.000Z web line\n")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["logs", "users"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "users-1 | info    started",
        "users-2 | plain line",
        "users-1 | was killed by SIGKILL; restarting in 0.5 s",
    ]
    last = runner.invoke(app, ["logs", "-n", "1", "--raw"])
    assert last.stdout.splitlines() == [
        "users-1 | [meshgate] was killed by SIGKILL; restarting in 0.5 s"
    ]
    unknown = runner.invoke(app, ["logs", "orders"])
    assert unknown.exit_code == 1
    assert "no logs of 'orders'" in unknown.stderr
    assert "services: users, web; instances: users-1, users-2, web-1" in unknown.stderr


def test_logs_where_nothing_ever_ran(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["logs", "--file", str(tmp_path / "meshgate.yaml")])
    assert result.exit_code == 1
    assert "meshgate up of this system never ran here" in result.stderr


def test_the_commands_are_listed(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--help"])
    for command in ("up", "ps", "logs", "scale", "down"):
        assert f" {command} " in result.stdout
    assert os.environ.get("MESHGATE_FILE") is None
