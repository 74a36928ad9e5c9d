"""The curated public API of meshgate.data."""

from __future__ import annotations

import meshgate.data
from meshgate.data import errors, migrations
from meshgate.errors import MeshgateError


def test_exported_members() -> None:
    for module in (meshgate.data, errors, migrations):
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"
    assert sorted(meshgate.data.__all__) == sorted(
        [
            "Cache",
            "CacheUnavailableError",
            "DataError",
            "Database",
            "DatabaseFileGoneError",
            "DatabaseUnavailableError",
            "MigrationError",
            "StatementTimeoutError",
            "UnmigratedDatabaseError",
        ]
    )


def test_errors_form_one_tree_with_statuses() -> None:
    assert issubclass(errors.DataError, MeshgateError)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.DataError)
        assert getattr(errors, name).__doc__
    assert errors.DatabaseUnavailableError.status == 503
    assert errors.CacheUnavailableError.status == 503
    assert errors.StatementTimeoutError.status == 503
    assert errors.UnmigratedDatabaseError.status == 503
    assert errors.DatabaseFileGoneError.status == 503
    assert errors.MigrationError.status == 500
