"""Errors of routing."""

from __future__ import annotations

from meshgate.errors import MeshgateError

__all__ = ["PathError"]


class PathError(MeshgateError):
    """A request path is refused: a bad percent-escape, a NUL byte, or an ambiguous
    separator (a backslash, or an encoded slash where they are refused)."""
