"""Which system a command means: ``meshgate ps``, ``logs``, ``scale``, ``restart`` and
``down`` find the running system without being told, from any folder at or below
the system file's folder or its ``root``.

Every ``meshgate up`` records its system in a per-user list,
``$XDG_STATE_HOME/meshgate/systems/`` (default ``~/.local/state/meshgate/systems/``),
one small JSON file per state folder: its name, its system file, its root and its
state folder. Whether it runs is not recorded but asked of the state folder's lock,
so an ``up`` that was killed never looks alive. Entries whose state folder is gone
are dropped.

:func:`find_system` resolves, in order: ``--file``; ``--system NAME``; the nearest
``meshgate.yaml`` at or above the current folder when it runs; the running systems
whose folder or root holds the current folder; the only system that runs. When
several fit, it says how to name one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from meshgate.runner.errors import AmbiguousSystemError, NotRunningError
from meshgate.runner.loader import DEFAULT_FILE, STATE_FOLDER
from meshgate.runner.state import StateDir, write_private

__all__ = ["Known", "find_system", "known_systems", "record_system", "systems_folder"]


def systems_folder() -> Path:
    """Where the per-user list of systems lives."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "meshgate" / "systems"


@dataclass(frozen=True)
class Known:
    """A system that ``meshgate up`` ran (or runs) for this user."""

    name: str
    file: Path
    root: Path
    state: Path
    started: float

    @property
    def folder(self) -> Path:
        return self.file.parent

    @property
    def state_dir(self) -> StateDir:
        return StateDir(self.state)

    def running(self) -> bool:
        return self.state_dir.running()

    def holds(self, folder: Path) -> bool:
        """Whether ``folder`` is at or below the system file's folder or its root."""
        return any(folder == base or base in folder.parents for base in (self.folder, self.root))

    def shown(self) -> str:
        return f"{self.name} ({_shown(self.file)})"


def _entry_path(state: Path) -> Path:
    digest = hashlib.sha256(str(state).encode()).hexdigest()[:16]
    return systems_folder() / f"{digest}.json"


def record_system(name: str, file: Path, root: Path, state: Path) -> None:
    """Remember that ``up`` runs this system (called with the state folder locked).
    Best effort: a read-only home only loses the finding from other folders."""
    data = {
        "system": name,
        "file": str(file),
        "root": str(root),
        "state": str(state),
        "started": time.time(),
    }
    path = _entry_path(state)
    with contextlib.suppress(OSError):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private(path, json.dumps(data, indent=1) + "\n")


def known_systems() -> list[Known]:
    """Every system recorded for this user whose state folder still exists, the most
    recently started first."""
    found = []
    try:
        entries = sorted(systems_folder().glob("*.json"))
    except OSError:
        return []
    for entry in entries:
        try:
            data = json.loads(entry.read_text(encoding="utf-8"))
            known = Known(
                name=str(data["system"]),
                file=Path(data["file"]),
                root=Path(data["root"]),
                state=Path(data["state"]),
                started=float(data.get("started", 0.0)),
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not known.state.is_dir():
            with contextlib.suppress(OSError):
                entry.unlink()
            continue
        found.append(known)
    return sorted(found, key=lambda k: k.started, reverse=True)


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _nearest_file(folder: Path) -> Path | None:
    for candidate in (folder, *folder.parents):
        path = candidate / DEFAULT_FILE
        if path.is_file():
            return path
    return None


def _state_of(file: Path) -> StateDir:
    return StateDir(file.absolute().parent / STATE_FOLDER)


def _choose(
    candidates: Sequence[Known], why: str, *, command: str
) -> tuple[StateDir, Known | None]:
    if len(candidates) == 1:
        return candidates[0].state_dir, candidates[0]
    lines = "; ".join(
        f"{k.shown()}: meshgate {command} --system {k.name} or --file {_shown(k.file)}"
        for k in candidates
    )
    raise AmbiguousSystemError(f"{len(candidates)} systems {why}; name one: {lines}")


def find_system(
    file: Path | None,
    system: str | None = None,
    *,
    command: str = "ps",
    running: bool = True,
    anywhere: bool = True,
    cwd: Path | None = None,
) -> tuple[StateDir, Known | None]:
    """The state folder of the system a command means (see the module docstring),
    and its entry in the per-user list when it came from there. With ``running``
    False (``logs``), systems that stopped count too. With ``anywhere`` False, a
    system that runs elsewhere is never taken for this folder's.

    Raises:
        AmbiguousSystemError: several systems fit; the message says how to name each.
        NotRunningError: ``--system NAME`` names no known system.
    """
    if file is not None:
        return _state_of(file), None
    here = (cwd or Path.cwd()).absolute()
    systems = known_systems()
    if system is not None:
        named = [k for k in systems if k.name == system]
        live = [k for k in named if k.running()]
        if live or named:
            return _choose(live or named, f"are named {system!r}", command=command)
        names = ", ".join(sorted({k.shown() for k in systems})) or "(none)"
        raise NotRunningError(
            f"no system named {system!r} was run by meshgate up for this user; known: {names}"
        )
    nearest = _nearest_file(here)
    if nearest is not None:
        state = _state_of(nearest)
        if state.running():
            return state, None
    live = [k for k in systems if k.running()]
    around = [k for k in live if k.holds(here)]
    if around:
        return _choose(around, f"run from {_shown(here) or '.'}", command=command)
    if not running:
        stopped = [k for k in systems if k.holds(here) and k.state_dir.logs.is_dir()]
        if nearest is None and stopped:
            return stopped[0].state_dir, stopped[0]
    if nearest is not None:
        return _state_of(nearest), None
    if anywhere and len(live) == 1:
        return live[0].state_dir, live[0]
    if anywhere and len(live) > 1:
        return _choose(live, "run for this user", command=command)
    return _state_of(here / DEFAULT_FILE), None
