"""Every error meshgate raises, as one tree rooted at :class:`MeshgateError`.

Catch :class:`MeshgateError` to handle anything meshgate raises on purpose; catch a
subclass to handle one kind. Messages name the bad value, where it was, and the fix.
This module holds the root and the errors every package shares (configuration);
each package keeps its own in its ``errors.py`` (``meshgate.gateway.errors``,
``meshgate.service.errors``, ``meshgate.data.errors``, ...), all rooted here. The
errors the gateway answers requests with are not exceptions but the catalogue in
:data:`meshgate.gateway.errors.PROBLEMS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

__all__ = [
    "PROBLEM_MEDIA_TYPE",
    "PROBLEM_TYPE",
    "ConfigError",
    "ConfigIssue",
    "MeshgateError",
    "SupervisorError",
]


PROBLEM_TYPE = "https://meshgate.dev/problems/"
"""The base of the ``type`` of every RFC 9457 problem the platform answers with, from
the gateway and from services alike (``<base><code>``, documented with each code)."""


PROBLEM_MEDIA_TYPE = "application/problem+json"
"""The media type of an RFC 9457 problem document."""


def problem_document(
    status: int, code: str, detail: str, *, title: str | None = None, **extensions: Any
) -> dict[str, Any]:
    """An RFC 9457 problem: ``type`` is the platform's URI for ``code``, ``title`` the
    status's reason phrase unless given, and ``code`` is repeated as the ``error``
    extension member (as the gateway and services send it); ``extensions`` follow
    (``instance``, ``request_id`` and any other member). Used by the control plane's
    APIs (admin, registry, observability, sagas); services have their own richer
    builder in :mod:`meshgate.service.problems`."""
    if title is None:
        try:
            title = HTTPStatus(status).phrase
        except ValueError:
            title = "Error"
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "error": code,
    }
    body.update((k, v) for k, v in extensions.items() if k not in _RESERVED)
    return body


_RESERVED = frozenset({"type", "title", "status", "detail", "error"})


class MeshgateError(Exception):
    """The root of every error meshgate raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem found in a configuration: where it is, what is wrong, and the fix."""

    path: str
    """The field's path, such as ``routes[2].upstream``; empty for the whole document."""
    message: str
    """What is wrong and how to fix it."""
    line: int | None = None
    """The 1-based line in the source file, when the problem could be located."""

    def __str__(self) -> str:
        where = self.path or "(document)"
        if self.line is not None:
            where = f"{where} (line {self.line})"
        return f"{where}: {self.message}"


class ConfigError(MeshgateError):
    """A configuration is invalid; :attr:`issues` lists every problem found."""

    def __init__(self, issues: Sequence[ConfigIssue], source: str | None = None) -> None:
        self.issues = tuple(issues)
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        """The error as text: a heading, then one line per issue."""
        count = len(self.issues)
        head = f"{self.source}: " if self.source else ""
        noun = "problem" if count == 1 else "problems"
        lines = [f"{head}{count} {noun} in the configuration"]
        lines.extend(f"  {issue}" for issue in self.issues)
        return "\n".join(lines)


class SupervisorError(MeshgateError):
    """The gateway supervisor could not start or keep its workers running."""
