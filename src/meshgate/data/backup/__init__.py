"""Backup and restore of a service's database, with proof that nothing was lost.

- :func:`backup` writes a consistent snapshot of the whole database into one archive
  file while the service keeps writing;
- :func:`restore` checks an archive (checksums, service, schema revision against the
  service's migrations) before it touches the target, restores into an empty
  database (or, with ``force``, over one), and compares every table's row count and
  checksum afterwards;
- :func:`verify` checks an archive without a database;
- :func:`backup_system` backs up every service of a system and records each one's
  snapshot point.

A logical archive (the default) restores on any engine: SQLite, PostgreSQL,
MariaDB/MySQL. The archive format, the consistency each engine gives and the
errors are described in docs/backup.md.
"""

from meshgate.data.backup._backup import Method, backup, default_archive_name
from meshgate.data.backup._restore import RestoreReport, TableCheck, restore
from meshgate.data.backup._system import (
    CONSISTENCY_STATEMENT,
    ServiceTarget,
    SystemBackup,
    backup_system,
)
from meshgate.data.backup._verify import VerifyReport, verify
from meshgate.data.backup.errors import (
    ArchiveError,
    BackupError,
    IncompatibleArchiveError,
    NativeToolError,
    RestoreVerificationError,
    TargetNotEmptyError,
)
from meshgate.data.backup.manifest import Manifest
from meshgate.data.backup.progress import Progress

__all__ = [
    "CONSISTENCY_STATEMENT",
    "ArchiveError",
    "BackupError",
    "IncompatibleArchiveError",
    "Manifest",
    "Method",
    "NativeToolError",
    "Progress",
    "RestoreReport",
    "RestoreVerificationError",
    "ServiceTarget",
    "SystemBackup",
    "TableCheck",
    "TargetNotEmptyError",
    "VerifyReport",
    "backup",
    "backup_system",
    "default_archive_name",
    "restore",
    "verify",
]
