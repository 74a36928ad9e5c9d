"""The errors of backup and restore, rooted at :class:`BackupError` (a
:class:`~meshgate.data.errors.DataError`).

Each one says what is wrong and what to do. None of them is raised after the
target database was changed, except :class:`RestoreVerificationError` (the data is
in, but does not match the archive) and, for MariaDB/MySQL, whose DDL commits by
itself, the restore errors documented in docs/backup.md.
"""

from __future__ import annotations

from meshgate.data.errors import DataError

__all__ = [
    "ArchiveError",
    "BackupError",
    "IncompatibleArchiveError",
    "NativeToolError",
    "RestoreVerificationError",
    "TargetNotEmptyError",
]


class BackupError(DataError):
    """A backup, restore or verification failed."""


class ArchiveError(BackupError):
    """The archive is not a meshgate archive, or it is truncated or altered: a
    checksum, the manifest or the container does not match."""


class IncompatibleArchiveError(BackupError):
    """The archive is sound but cannot go into this target: another service's, a
    schema newer than the service's migrations, or a native dump of another engine."""


class TargetNotEmptyError(BackupError):
    """The target database holds data; restore refuses to overwrite it without ``force``."""


class RestoreVerificationError(BackupError):
    """After loading, the target's row counts or checksums differ from the archive's."""


class NativeToolError(BackupError):
    """A native dump tool (pg_dump, pg_restore, mariadb-dump, mariadb) is missing or failed."""
