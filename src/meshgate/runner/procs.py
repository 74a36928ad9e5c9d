"""Operating-system process plumbing for the runner: identity by PID and start time,
process groups, the launch shim and the watchdog.

Every process the runner starts leads its own session (and so its own process
group): a Ctrl-C in the terminal reaches only the runner, which then stops them in
order, and a whole group (a gateway and its workers, a shell and its children)
can be signalled and checked at once.

Three layers make sure nothing outlives the runner:

1. the runner stops every group itself and checks, by PID, that none is left;
2. on Linux each process gets ``PR_SET_PDEATHSIG`` (SIGTERM) through a tiny launch
   shim, so it is told to stop if the runner dies, even by SIGKILL;
3. a watchdog process, in a session of its own, holds a pipe from the runner and is
   told every group; when the pipe closes without a goodbye (the runner died),
   it sends SIGTERM to every group still listed, then SIGKILL after a grace
   period. The next ``up`` or ``down`` also removes anything recorded in the
   state folder that is still running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "OWNERSHIP_KNOWN",
    "Pid",
    "Watchdog",
    "command_line",
    "group_members",
    "launch_argv",
    "listener_pids",
    "listening",
    "owns_listener",
    "port_in_use",
    "signal_group",
]

_LINUX = sys.platform.startswith("linux")

_SHIM = """\
import os, sys
if sys.platform.startswith("linux"):
    import ctypes, signal
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass
if os.getppid() != int(sys.argv[1]):
    os._exit(70)  # the runner died before the signal was armed
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as exc:
    sys.stderr.write(f"meshgate: cannot run {sys.argv[2]!r}: {exc.strerror}\\n")
    os._exit(127)
"""
"""Arms the parent-death signal, then becomes the real program (same PID)."""

WATCHDOG_GRACE = 10.0
"""How long the watchdog waits after SIGTERM before it sends SIGKILL."""

_WATCHDOG = f"""\
import os, signal, sys, time
for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
    signal.signal(sig, signal.SIG_IGN)
groups = set()
clean = False
for line in sys.stdin:
    op, _, arg = line.strip().partition(" ")
    if op == "bye":
        clean = True
    elif arg.isdigit():
        (groups.add if op == "+" else groups.discard)(int(arg))
def send(group, sig):
    try:
        os.killpg(group, sig)
        return True
    except OSError:
        return False
def running(wanted):
    # Zombies wait for a reaper that may be slow; they are dead all the same.
    if not os.path.isdir("/proc/self"):
        return {{g for g in wanted if send(g, 0)}}
    found = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{{entry}}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError, ValueError):
            continue
        if fields[0] not in (b"Z", b"X") and int(fields[2]) in wanted:
            found.add(int(fields[2]))
    return found
if not clean:
    live = {{g for g in groups if send(g, signal.SIGTERM)}}
    deadline = time.monotonic() + {WATCHDOG_GRACE}
    while live and time.monotonic() < deadline:
        time.sleep(0.1)
        live = running(live)
    for group in live:
        send(group, signal.SIGKILL)
"""
"""Waits for EOF on stdin; unless told ``bye`` first, stops every group it was told."""


def launch_argv(argv: list[str]) -> list[str]:
    """``argv`` run through the shim that arms the parent-death signal (Linux), so
    that the process is told to stop if the runner dies."""
    if not _LINUX:
        return argv
    return [sys.executable, "-S", "-c", _SHIM, str(os.getpid()), *argv]


# ---------------------------------------------------------------------------- /proc


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; the fields follow the last ')'.
    return text[text.rindex(")") + 2 :].split()


@dataclass(frozen=True)
class Pid:
    """A process identified by PID and start time, so that a reused PID is never
    taken for the process that had it (the start time is None off Linux)."""

    pid: int
    started: int | None

    @classmethod
    def of(cls, pid: int) -> Pid | None:
        """The running process ``pid``, or None if there is none."""
        if not _LINUX:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                pass
            return cls(pid, None)
        fields = _stat(pid)
        return None if fields is None else cls(pid, int(fields[19]))

    def alive(self) -> bool:
        """Running (a zombie is dead: it only waits for its parent to reap it)."""
        if not _LINUX:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        fields = _stat(self.pid)
        return (
            fields is not None
            and (self.started is None or int(fields[19]) == self.started)
            and fields[0] not in ("Z", "X")
        )

    def to_json(self) -> list[int | None]:
        return [self.pid, self.started]

    @classmethod
    def from_json(cls, value: object) -> Pid | None:
        if (
            isinstance(value, list)
            and len(value) == 2
            and isinstance(value[0], int)
            and (value[1] is None or isinstance(value[1], int))
        ):
            return cls(value[0], value[1])
        return None


def group_members(pgid: int) -> list[Pid]:
    """The live (non-zombie) processes in process group ``pgid``."""
    if not _LINUX:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [Pid(pgid, None)]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is not None and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append(Pid(int(entry.name), int(fields[19])))
    return found


def descendants(pid: int) -> list[Pid]:
    """Every live process below ``pid`` (children, their children, ...); Linux only."""
    if not _LINUX:
        return []
    parents: dict[int, list[Pid]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is not None and fields[0] not in ("Z", "X"):
            parents.setdefault(int(fields[1]), []).append(Pid(int(entry.name), int(fields[19])))
    out: list[Pid] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child.pid)
    return out


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``; False if no process is in it."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a group we do not own: not ours
        return False
    return True


def kill_leftovers(pids: list[Pid], grace: float = 5.0) -> list[Pid]:
    """Stop processes (and their groups) left by a runner that died: SIGTERM, then
    SIGKILL after ``grace`` seconds. Returns those that were still running."""
    alive = [p for p in pids if p.alive()]
    for p in alive:
        with contextlib.suppress(OSError):
            os.kill(p.pid, signal.SIGTERM)
        signal_group(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p.alive() or group_members(p.pid) for p in alive):
        time.sleep(0.1)
    for p in alive:
        if p.alive():
            with contextlib.suppress(OSError):
                os.kill(p.pid, signal.SIGKILL)
        signal_group(p.pid, signal.SIGKILL)
    return alive


# ---------------------------------------------------------------------------- listeners

OWNERSHIP_KNOWN = _LINUX
"""Whether :func:`owns_listener` can tell who holds a port (it reads /proc: Linux)."""

_LISTEN = "0A"
"""The state of a listening socket in /proc/net/tcp."""


def listening(port: int) -> set[int]:
    """The socket inodes listening on TCP ``port`` (any address, IPv4 or IPv6), from
    /proc/net/tcp of this network namespace; empty off Linux."""
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            local_port = int(fields[1].rpartition(":")[2], 16)
            if local_port == port:
                inodes.add(int(fields[9]))
    return inodes


def _socket_inodes(pid: int) -> set[int]:
    """The socket inodes process ``pid`` holds open (empty when it cannot be read:
    gone, or another user's)."""
    found: set[int] = set()
    try:
        entries = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return found
    for entry in entries:
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def listener_pids(port: int) -> list[int]:
    """The processes (of this user: others' are not readable) that hold a socket
    listening on ``port``."""
    inodes = listening(port)
    if not inodes:
        return []
    return sorted(
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _socket_inodes(int(entry.name)) & inodes
    )


def owns_listener(pid: int, port: int) -> bool | None:
    """Whether the socket listening on ``port`` belongs to process ``pid``, its process
    group or a process below it, rather than to some other process. None where it
    cannot be told (not Linux)."""
    if not OWNERSHIP_KNOWN:
        return None
    inodes = listening(port)
    if not inodes:
        return False
    tree = {pid, *(p.pid for p in group_members(pid)), *(p.pid for p in descendants(pid))}
    return any(_socket_inodes(member) & inodes for member in tree)


def command_line(pid: int) -> str:
    """The command line of ``pid`` (shortened), or ``?``."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    text = raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    return text if len(text) <= 80 else text[:77] + "..."


def port_in_use(host: str, port: int) -> str | None:
    """Why ``port`` cannot be listened on at ``host`` now (naming the processes that
    hold it when they can be known), or None if it is free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    bind_host = "" if host in ("0.0.0.0", "::", "*", "") else host.strip("[]")
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As servers do: a connection of an earlier run in TIME_WAIT does not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bind_host, port))
        except OSError as exc:
            error = exc.strerror or str(exc)
        else:
            # Without SO_REUSEPORT on ours, the bind fails for any listener that
            # overlaps, even one that set SO_REUSEPORT itself (a gateway's).
            return None
    holders = listener_pids(port)
    if holders:
        named = ", ".join(f"pid {p} ({command_line(p)})" for p in holders)
        return f"{error}: held by {named}"
    return error


# ---------------------------------------------------------------------------- watchdog


class Watchdog:
    """A process in its own session that stops every group it was told about when
    the runner dies without saying goodbye (see the module docstring)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        self._proc = subprocess.Popen(  # noqa: S603 - our own interpreter and code
            [sys.executable, "-S", "-c", _WATCHDOG],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )

    def _send(self, line: str) -> None:
        if self._proc is None or self._proc.stdin is None:
            return
        # A watchdog killed by someone else: the runner still stops its groups itself.
        with contextlib.suppress(OSError, ValueError):
            self._proc.stdin.write(line.encode() + b"\n")
            self._proc.stdin.flush()

    def add(self, pgid: int) -> None:
        """Watch process group ``pgid``."""
        self._send(f"+ {pgid}")

    def remove(self, pgid: int) -> None:
        """Forget ``pgid`` (its processes are gone)."""
        self._send(f"- {pgid}")

    def close(self) -> None:
        """Say goodbye and wait for the watchdog to exit (the runner stopped cleanly)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            if proc.stdin is not None:
                proc.stdin.write(b"bye\n")
                proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover - it only reads stdin
            proc.kill()
            proc.wait(5)
