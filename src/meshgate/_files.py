"""Small file helpers shared by the gateway and the runner."""

from __future__ import annotations

from pathlib import Path

__all__ = ["file_signature"]


def file_signature(path: Path) -> tuple[float, int] | None:
    """(modification time, size) of ``path``, or None when it cannot be read: what
    the file watchers compare once a second to notice a change."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime, stat.st_size)
