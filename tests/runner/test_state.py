"""The state folder: one runner per system, private files, the last run's logs kept,
and the processes a dead runner left behind."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from meshgate.runner import AlreadyRunningError, StateDir
from meshgate.runner.procs import Pid


def test_one_runner_per_state_folder(tmp_path: Path) -> None:
    first = StateDir(tmp_path / ".meshgate")
    assert not first.running()
    first.acquire()
    first.write_state({"pid": 4242})
    try:
        assert first.running()
        second = StateDir(tmp_path / ".meshgate")
        with pytest.raises(AlreadyRunningError, match=r"already running \(meshgate up, pid 4242\)"):
            second.acquire()
        # Another folder is another system.
        other = StateDir(tmp_path / "elsewhere" / ".meshgate")
        other.acquire()
        other.release()
    finally:
        first.release()
    assert not first.running()
    assert first.read_state() is None  # removed with the lock


def test_the_lock_dies_with_its_process(tmp_path: Path) -> None:
    state = StateDir(tmp_path / ".meshgate")
    code = (
        "import sys, time; from pathlib import Path; from meshgate.runner import StateDir; "
        "s = StateDir(Path(sys.argv[1])); s.acquire(); print('locked', flush=True); time.sleep(60)"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code, str(state.path)], stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "locked"
            assert state.running()
        finally:
            proc.kill()
    assert not state.running()
    state.acquire()
    state.release()


def test_prepare_keeps_the_last_runs_logs_and_ignores_itself(tmp_path: Path) -> None:
    state = StateDir(tmp_path / ".meshgate")
    state.prepare()
    assert stat.S_IMODE(state.path.stat().st_mode) == 0o700
    assert (state.path / ".gitignore").read_text().splitlines()[-1] == "*"
    state.log_file("web-1").write_text("first run\n")
    state.prepare()
    assert not state.log_file("web-1").exists()
    assert (state.logs / "previous" / "web-1.log").read_text() == "first run\n"
    state.log_file("web-2").write_text("second run\n")
    state.prepare()
    assert [p.name for p in (state.logs / "previous").iterdir()] == ["web-2.log"]


def test_secrets_are_private_and_kept(tmp_path: Path) -> None:
    state = StateDir(tmp_path / ".meshgate")
    secret = state.secret("service-secret")
    assert len(secret) >= 32
    assert state.secret("service-secret") == secret
    path = state.path / "service-secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("  given-by-hand  \n")
    assert state.secret("service-secret") == "given-by-hand"
    empty = tmp_path / "deep" / "token"
    empty.parent.mkdir()
    empty.write_text("")
    assert len(StateDir.token_at(empty)) >= 32  # an empty file gets a new token


def test_recorded_processes_that_still_run_are_leftovers(tmp_path: Path) -> None:
    state = StateDir(tmp_path / ".meshgate")
    state.prepare()
    me = Pid.of(os.getpid())
    assert me is not None
    gone = Pid(me.pid, (me.started or 0) + 1)  # same PID, another process
    state.record_pids({"users-1": me, "users-2": gone})
    assert state.recorded_pids() == {"users-1": me, "users-2": gone}
    assert state.leftovers() == {"users-1": me}
    state.pids_file.write_text("not json")
    assert state.recorded_pids() == {}
