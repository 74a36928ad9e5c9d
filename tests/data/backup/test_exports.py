"""The public API of meshgate.data.backup and its error tree."""

from __future__ import annotations

import meshgate.data.backup
from meshgate.data import DataError
from meshgate.data.backup import errors


def test_exported_members() -> None:
    for module in (meshgate.data.backup, errors):
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"
    assert {"backup", "restore", "verify", "backup_system", "Manifest"} <= set(
        meshgate.data.backup.__all__
    )


def test_errors_form_one_tree_under_data_error() -> None:
    for name in errors.__all__:
        error = getattr(errors, name)
        assert issubclass(error, errors.BackupError)
        assert issubclass(error, DataError)
        assert error.__doc__
