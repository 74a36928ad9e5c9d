"""Nothing outlives the runner: process groups, the parent-death signal armed by the
launch shim, and the watchdog that stops every group when the runner dies."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from meshgate.runner.procs import (
    Pid,
    Watchdog,
    command_line,
    descendants,
    group_members,
    kill_leftovers,
    launch_argv,
    listener_pids,
    listening,
    owns_listener,
    port_in_use,
    signal_group,
)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="process plumbing is checked on Linux"
)


def sleeper(*extra: str) -> subprocess.Popen[bytes]:
    """A process in a session of its own that sleeps (and starts ``extra`` children)."""
    code = (
        "import subprocess, sys, time\n"
        + "".join(
            f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])  # {e}\n"
            for e in extra
        )
        + "time.sleep(60)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def wait_until(check: object, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_pid_identity_survives_reuse() -> None:
    me = Pid.of(os.getpid())
    assert me is not None
    assert me.alive()
    assert not Pid(me.pid, (me.started or 0) + 1).alive()
    assert Pid.from_json(me.to_json()) == me
    assert Pid.from_json(["x", 1]) is None


def test_a_group_is_signalled_and_checked_as_one() -> None:
    proc = sleeper("child")
    try:
        assert wait_until(lambda: len(group_members(proc.pid)) == 2)
        assert {p.pid for p in descendants(os.getpid())} >= {proc.pid}
        assert signal_group(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert wait_until(lambda: group_members(proc.pid) == [])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_the_watchdog_stops_the_groups_of_a_runner_that_died() -> None:
    watchdog = Watchdog()
    watchdog.start()
    kept, forgotten = sleeper("child"), sleeper()
    try:
        assert wait_until(lambda: len(group_members(kept.pid)) == 2)
        watchdog.add(kept.pid)
        watchdog.add(forgotten.pid)
        watchdog.remove(forgotten.pid)
        proc = watchdog._proc
        assert proc is not None
        assert proc.stdin is not None
        proc.stdin.close()  # what the runner's death does: no goodbye
        proc.wait(15)
        assert wait_until(lambda: group_members(kept.pid) == [])
        assert forgotten.poll() is None  # not told to it, or no longer
    finally:
        for p in (kept, forgotten):
            if p.poll() is None:
                p.kill()
            p.wait(10)


def test_the_watchdog_leaves_everything_after_a_goodbye() -> None:
    watchdog = Watchdog()
    watchdog.start()
    proc = sleeper()
    try:
        watchdog.add(proc.pid)
        watchdog.close()
        time.sleep(0.2)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(10)


def test_the_launch_shim_stops_a_child_whose_parent_died() -> None:
    # An intermediate parent starts a child through the shim, then is SIGKILLed. The
    # shim's argv is built in that parent: it checks that its parent is the one that
    # built it (else it exits at once, and nothing here would be tested).
    code = textwrap.dedent(
        """
        import subprocess, sys, time
        from meshgate.runner.procs import launch_argv
        argv = launch_argv([sys.executable, "-c", "import time; time.sleep(60)"])
        child = subprocess.Popen(argv)
        print(child.pid, flush=True)
        time.sleep(60)
        """
    )
    program = f"{sys.executable}\0-c\0import time; time.sleep(60)\0".encode()
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
    ) as parent:
        try:
            assert parent.stdout is not None
            child = Pid.of(int(parent.stdout.readline()))
            assert child is not None
            # The shim has become the program: same PID, the program's command line.
            cmdline = Path(f"/proc/{child.pid}/cmdline")
            assert wait_until(lambda: cmdline.read_bytes() == program), cmdline.read_bytes()
        finally:
            parent.kill()
    assert wait_until(lambda: not child.alive(), 5)


def test_a_missing_program_is_reported_by_the_shim() -> None:
    result = subprocess.run(
        launch_argv(["no-such-program-here", "x"]), capture_output=True, text=True, check=False
    )
    assert result.returncode == 127
    assert "meshgate: cannot run 'no-such-program-here'" in result.stderr


def test_leftovers_of_a_dead_runner_are_stopped() -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], start_new_session=True, stdout=subprocess.PIPE
    ) as stubborn:
        assert stubborn.stdout is not None
        stubborn.stdout.readline()
        pid = Pid.of(stubborn.pid)
        assert pid is not None
        began = time.monotonic()
        assert kill_leftovers([pid], grace=0.5) == [pid]
        stubborn.wait(10)
    assert stubborn.returncode == -signal.SIGKILL
    assert time.monotonic() - began < 5


# ---------------------------------------------------------------------------- listeners


def listener_child(port: int) -> subprocess.Popen[bytes]:
    """A shell whose child (not itself) listens on ``port``, in a session of its own."""
    code = (
        "import socket, time; s = socket.socket(); "
        f"s.bind(('127.0.0.1', {port})); s.listen(); print('up', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        ["sh", "-c", f'{sys.executable} -c "{code}"; true'],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"up\n"
    return proc


def test_the_listener_of_a_port_belongs_to_whoever_holds_it() -> None:
    with socket.socket() as mine:
        mine.bind(("127.0.0.1", 0))
        port = mine.getsockname()[1]
        assert listening(port) == set()  # bound, not listening
        assert port_in_use("127.0.0.1", port) is not None  # but taken all the same
        mine.listen()
        assert len(listening(port)) == 1
        assert listener_pids(port) == [os.getpid()]
        assert owns_listener(os.getpid(), port) is True
        other = sleeper()
        try:
            # Something answers on the port, but not the process that was started.
            assert owns_listener(other.pid, port) is False
        finally:
            other.kill()
            other.wait(10)
        taken = port_in_use("127.0.0.1", port)
        assert taken is not None
        assert taken.startswith("Address already in use: held by ")
        assert f"pid {os.getpid()} (" in taken
    assert port_in_use("127.0.0.1", port) is None
    assert owns_listener(os.getpid(), port) is False


def test_a_listener_of_a_child_is_the_started_process_s() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = listener_child(port)
    try:
        assert owns_listener(proc.pid, port) is True
        (holder,) = listener_pids(port)
        assert holder != proc.pid
        assert "socket.socket()" in command_line(holder)
        assert port_in_use("0.0.0.0", port) is not None  # overlaps 127.0.0.1
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()
