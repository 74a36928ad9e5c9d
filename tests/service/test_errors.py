"""The service SDK's errors: one tree, each documented, each with its HTTP status."""

from __future__ import annotations

import meshgate.service
from meshgate.errors import MeshgateError
from meshgate.service import client, errors, identity


def test_errors_form_one_tree_with_statuses() -> None:
    assert issubclass(errors.ServiceError, MeshgateError)
    for name in errors.__all__:
        error = getattr(errors, name)
        assert issubclass(error, errors.ServiceError), name
        assert error.__doc__, name
        assert getattr(meshgate.service, name) is error, f"meshgate.service.{name}"
    assert errors.ServiceUnavailableError.status == 503
    assert errors.NoRegistryError.status == 503
    assert errors.DeadlineExceededError.status == 504
    assert errors.IdentityError.status == 401
    # Where they were first defined, they still are.
    assert client.ServiceUnavailableError is errors.ServiceUnavailableError
    assert client.DeadlineExceededError is errors.DeadlineExceededError
    assert identity.IdentityError is errors.IdentityError
