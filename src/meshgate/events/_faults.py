"""Named points where a test can freeze a process to kill it with SIGKILL at an
exact moment (crash injection), off unless ``MESHGATE_FAULT_PAUSE`` is set.

``MESHGATE_FAULT_PAUSE=relay.published:/tmp/x`` makes the process write ``/tmp/x``
when it reaches the point ``relay.published`` and then hang there for ever, so
that the test, seeing the file, kills it exactly between two steps that a crash
must not break. The variable is read once, at import: a process without it pays one
comparison per point.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

__all__ = ["point"]

_SPEC = os.environ.get("MESHGATE_FAULT_PAUSE", "")
_POINT, _, _FILE = _SPEC.partition(":")


async def point(name: str) -> None:
    """Hang here for ever when the fault spec names ``name`` (after writing its file)."""
    if not _POINT or name != _POINT:
        return
    Path(_FILE).write_text(str(os.getpid()), encoding="utf-8")  # noqa: ASYNC240 - once, then hang
    await asyncio.Event().wait()  # until SIGKILL: that is the point
