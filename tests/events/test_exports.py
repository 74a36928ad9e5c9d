"""The curated public API of meshgate.events."""

from __future__ import annotations

import meshgate.events
from meshgate.errors import MeshgateError
from meshgate.events import errors


def test_exported_members() -> None:
    for module in (meshgate.events, errors):
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"
    assert "Events" in meshgate.events.__all__
    assert "Event" in meshgate.events.__all__


def test_errors_form_one_tree_with_statuses_and_docstrings() -> None:
    assert issubclass(errors.EventsError, MeshgateError)
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.EventsError)
        assert cls.__doc__
    assert errors.BusUnavailableError.status == 503
    assert errors.SagaNotFoundError.status == 404
    assert errors.DeadLetterNotFoundError.status == 404
