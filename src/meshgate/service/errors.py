"""The errors of the service SDK, rooted at :class:`ServiceError` (itself a
:class:`~meshgate.errors.MeshgateError`).

Those that can reach a handler's boundary carry :attr:`ServiceError.status`, the HTTP
status the service answers with (as an RFC 9457 problem, see
:mod:`meshgate.service.problems`).
"""

from __future__ import annotations

from meshgate.errors import MeshgateError

__all__ = [
    "DeadlineExceededError",
    "IdentityError",
    "NoRegistryError",
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
