"""Every error the runner raises, rooted at :class:`meshgate.errors.MeshgateError`.

A bad system file is a :class:`meshgate.errors.ConfigError`, like a bad gateway
configuration. Catch :class:`RunnerError` for anything else ``meshgate up`` and its
companion commands raise on purpose.
"""

from __future__ import annotations

from meshgate.errors import MeshgateError

__all__ = [
    "AlreadyRunningError",
    "AmbiguousSystemError",
    "ControlError",
    "NotRunningError",
    "RunnerError",
    "StartupError",
]


class RunnerError(MeshgateError):
    """The root of every error the runner raises on purpose."""


class StartupError(RunnerError):
    """A process of the system could not be started or did not become ready; the
    message names it, says why, and ends with its last log lines."""


class AlreadyRunningError(RunnerError):
    """The system is already running from this state folder (one ``up`` per system)."""


class NotRunningError(RunnerError):
    """No ``meshgate up`` of this system is running, so there is nothing to ask."""


class AmbiguousSystemError(RunnerError):
    """Several running systems fit where a command was run; the message names each
    and how to pick one (``--system NAME`` or ``--file FILE``)."""


class ControlError(RunnerError):
    """The running system refused or could not answer a control request
    (``ps``, ``scale``, ``down``); the message says why."""
