"""Every error the registry raises, rooted at :class:`meshgate.errors.MeshgateError`.

Catch :class:`RegistryError` for anything the registry raises on purpose,
:class:`RegistryUnavailableError` for "try again later" (the backend or the remote
registry cannot be reached), :class:`InvalidNameError` for a bad service name or
instance id.
"""

from __future__ import annotations

from meshgate.errors import MeshgateError

__all__ = [
    "InvalidNameError",
    "RegistryClosedError",
    "RegistryError",
    "RegistryRequestError",
    "RegistryStoreError",
    "RegistryUnavailableError",
]


class RegistryError(MeshgateError):
    """The root of every error the service registry raises on purpose."""


class InvalidNameError(RegistryError, ValueError):
    """A service name or instance id is not valid; the message names the field and the fix."""

    def __init__(self, field: str, value: str, message: str) -> None:
        self.field = field
        """Which name was bad: ``service`` or ``instance id``."""
        self.value = value
        """The bad value as given."""
        super().__init__(f"{field}: {message}")


class RegistryUnavailableError(RegistryError):
    """The registry's backend (Redis, the SQLite file) or the remote registry cannot be
    reached right now; the operation did not happen, retry later."""


class RegistryStoreError(RegistryUnavailableError):
    """The SQLite file that persists the embedded registry cannot be opened, read or written."""


class RegistryClosedError(RegistryUnavailableError):
    """The registry was closed (its process is shutting down); waiting watchers are released."""


class RegistryRequestError(RegistryError):
    """The remote registry refused a request (an HTTP 4xx other than an unknown instance)."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        self.status = status
        """The HTTP status of the answer."""
        self.error = error
        """The error code from the answer, such as ``invalid_spec``."""
        self.detail = detail
        """What was wrong and how to fix it, as the registry said."""
        super().__init__(f"{status} {error}: {detail}")
