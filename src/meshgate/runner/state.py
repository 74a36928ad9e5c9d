"""The state folder of a system: ``.meshgate/`` beside its system file.

What it holds::

    .meshgate/
      .gitignore        "*": nothing in here belongs in version control
      up.log            the output of a meshgate up -d (a detached run)
      backups/          meshgate db backup archives, by default
      lock              held (flock) by the running ``meshgate up``: one per system
      state.json        0600: the runner's PID, its control port and token, the URLs
      pids.json         the processes running now, to clean up after a runner that died
      service-secret    0600: MESHGATE_SERVICE_SECRET of the system's services
      admin.token       0600: the gateway's admin token (unless its configuration sets one)
      registry.token    0600: the registry token services use
      registry.sqlite   the registry, when the gateway configuration persists it
      gateway.yaml      the gateway configuration as run (ports and token files filled in)
      logs/NAME.log     each instance's output, a timestamp before each line
      logs/previous/    the logs of the run before
      data/             embedded databases and the embedded broker
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import IO, Any

from meshgate.runner.errors import AlreadyRunningError
from meshgate.runner.procs import Pid

__all__ = ["StateDir", "write_private"]


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600, atomically (rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    tmp.replace(path)


class StateDir:
    """The state folder at ``path`` (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock: IO[bytes] | None = None

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def pids_file(self) -> Path:
        return self.path / "pids.json"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def data(self) -> Path:
        return self.path / "data"

    @property
    def gateway_config(self) -> Path:
        return self.path / "gateway.yaml"

    def log_file(self, instance: str) -> Path:
        return self.logs / f"{instance}.log"

    # -- setup

    def ensure(self) -> None:
        """Create the folder (0700) and its ``.gitignore`` if they are missing."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        ignore = self.path / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# Written by meshgate: local state, never committed.\n*\n")

    def prepare(self) -> None:
        """Create the folder (see :meth:`ensure`); keep the last run's logs in
        ``logs/previous``."""
        self.ensure()
        self.data.mkdir(exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        previous = self.logs / "previous"
        old = sorted(self.logs.glob("*.log"))
        if old:
            shutil.rmtree(previous, ignore_errors=True)
            previous.mkdir()
            for path in old:
                path.replace(previous / path.name)

    def acquire(self) -> None:
        """Take the lock for this run (released when the process ends, however).

        Raises:
            AlreadyRunningError: another ``meshgate up`` of this system holds it.
        """
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = (self.path / "lock").open("ab")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            state = self.read_state() or {}
            raise AlreadyRunningError(
                f"this system is already running (meshgate up, pid {state.get('pid', '?')}) "
                f"with its state in {self.path}; see it with meshgate ps, stop it with "
                "meshgate down"
            ) from None
        self._lock = lock

    def release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            with contextlib.suppress(OSError):
                self.state_file.unlink(missing_ok=True)
            lock.close()

    def running(self) -> bool:
        """Whether a ``meshgate up`` holds this folder's lock now."""
        try:
            lock = (self.path / "lock").open("rb")
        except FileNotFoundError:
            return False
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False

    # -- files

    def read_state(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def write_state(self, state: dict[str, Any]) -> None:
        write_private(self.state_file, json.dumps(state, indent=2, sort_keys=True) + "\n")

    def secret(self, name: str, length: int = 32) -> str:
        """The secret kept in file ``name`` (0600), made on first use."""
        return self.token_at(self.path / name, length)

    @staticmethod
    def token_at(path: Path, length: int = 32) -> str:
        """The token in ``path``: its content, or a new random one written there
        (0600, its folder 0700) when the file is missing or empty, as the gateway does."""
        with contextlib.suppress(FileNotFoundError):
            text = path.read_text(encoding="utf-8").strip()
            if text:
                return text
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        token = secrets.token_urlsafe(length)
        write_private(path, token + "\n")
        return token

    def record_pids(self, entries: dict[str, Pid]) -> None:
        """Remember the processes running now, by instance name."""
        data = {name: pid.to_json() for name, pid in sorted(entries.items())}
        write_private(self.pids_file, json.dumps(data, indent=1) + "\n")

    def recorded_pids(self) -> dict[str, Pid]:
        """The processes the last runner recorded (whether or not they still run)."""
        try:
            data = json.loads(self.pids_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        out = {}
        for name, value in data.items():
            pid = Pid.from_json(value)
            if pid is not None:
                out[str(name)] = pid
        return out

    def leftovers(self) -> dict[str, Pid]:
        """Recorded processes that still run: left by a runner that died."""
        return {name: pid for name, pid in self.recorded_pids().items() if pid.alive()}
