"""The errors of the service SDK, rooted at :class:`ServiceError` (itself a
:class:`~meshgate.errors.MeshgateError`).

Those that can reach a handler's boundary carry :attr:`ServiceError.status`, the HTTP
status the service answers with (as an RFC 9457 problem, see
:mod:`meshgate.service.problems`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import HTTPException

from meshgate.errors import MeshgateError

__all__ = [
    "DeadlineExceededError",
    "IdentityError",
    "NoRegistryError",
    "ProblemError",
    "ServiceError",
    "ServiceStartupError",
    "ServiceUnavailableError",
]


class ServiceError(MeshgateError):
    """A service SDK operation failed."""

    status: int = 500
    """The HTTP status a service answers with when the error reaches a handler's boundary."""


class ServiceUnavailableError(ServiceError):
    """No instance of the called service could answer: none registered, the registry
    unreachable with nothing cached, every try failed, or its circuit is open (503)."""

    status = 503


class NoRegistryError(ServiceUnavailableError):
    """A client was called with neither a registry URL (``MESHGATE_REGISTRY_URL``) nor
    fixed endpoints to find the service by (503)."""


class DeadlineExceededError(ServiceError):
    """The call's timeout or the current request's deadline passed (504)."""

    status = 504


class IdentityError(ServiceError):
    """An identity token is missing, malformed, expired or not for this service (401)."""

    status = 401


class ServiceStartupError(ServiceError):
    """The service cannot start: its database is not at the revision its migrations
    expect (and it may not migrate it), or it went away."""


class ProblemError(HTTPException, ServiceError):
    """Raise it in a handler to answer with a problem of your own::

        raise ProblemError(409, f"a user with email {email!r} already exists",
                           code="email_taken", email=email)

    ``code`` becomes the ``error`` member (and, for one of :data:`PROBLEMS`, the
    ``type`` and ``title``); ``type`` and ``title`` may be given for your own problem
    types; other keywords become extension members. A plain ``HTTPException`` works
    too (``type`` ``about:blank``).
    """

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        code: str | None = None,
        type: str | None = None,  # noqa: A002 - the RFC 9457 member's name
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(status, detail, headers=dict(headers) if headers else None)
        self.code = code
        self.type = type
        self.title = title
        self.extensions = extensions
