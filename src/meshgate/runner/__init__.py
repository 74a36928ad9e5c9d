"""``meshgate up``: run a whole system (the gateway with its registry, and every
service as supervised processes) from one system file, ``meshgate.yaml``.

:func:`load_system` validates a system file (errors name the field, its line and
the fix, like the gateway configuration's); :class:`Runner` runs it; the control
endpoint's :func:`request` is what ``meshgate ps``, ``scale`` and ``down`` use, and
:func:`find_system` is how they find the system without being told.
The reference is docs/up.md.
"""

from __future__ import annotations

from meshgate.runner.control import request
from meshgate.runner.errors import (
    AlreadyRunningError,
    AmbiguousSystemError,
    ControlError,
    NotRunningError,
    RunnerError,
    StartupError,
)
from meshgate.runner.loader import SystemFile, load_system, loads_system, start_order
from meshgate.runner.model import GatewaySpec, ReadySpec, ServiceSpec, System
from meshgate.runner.state import StateDir
from meshgate.runner.supervisor import Runner
from meshgate.runner.systems import find_system, known_systems

__all__ = [
    "AlreadyRunningError",
    "AmbiguousSystemError",
    "ControlError",
    "GatewaySpec",
    "NotRunningError",
    "ReadySpec",
    "Runner",
    "RunnerError",
    "ServiceSpec",
    "StartupError",
    "StateDir",
    "System",
    "SystemFile",
    "find_system",
    "known_systems",
    "load_system",
    "loads_system",
    "request",
    "start_order",
]
