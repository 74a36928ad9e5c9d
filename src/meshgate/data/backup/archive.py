"""The archive container: one zip file (``.mgbak``) holding ``manifest.json``, one
JSON Lines member per table (``tables/NNNN.jsonl``, deflate-compressed) and, for a
native backup, the native dump (``native/...``).

Integrity is checked at three levels, all before a restore touches its target:

- the zip directory sits at the end of the file, so a truncated archive does not
  open; every member has the zip's CRC-32;
- ``manifest.json`` lists the SHA-256 and size of every other member; an extra or
  missing member is refused;
- the archive's comment holds the SHA-256 of ``manifest.json`` itself, so an altered
  manifest is refused too.

This detects damage and careless edits, not an attacker who rewrites both the
manifest and the comment: sign or store archives where they cannot be changed if
that matters.

An archive is written under a temporary name beside its final path and renamed when
complete: a crash never leaves a half archive under the real name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from pydantic import ValidationError

from meshgate.data.backup.errors import ArchiveError
from meshgate.data.backup.manifest import FORMAT, FORMAT_VERSION, Manifest, MemberEntry

__all__ = ["MANIFEST", "ArchiveReader", "ArchiveWriter", "MemberWriter", "rows_altered"]

MANIFEST = "manifest.json"
SUFFIX = ".mgbak"
"""The usual file suffix of an archive."""
_COMMENT = b"meshgate-backup/%d manifest-sha256="
_COMMENT_RE = re.compile(rb"^meshgate-backup/(\d+) manifest-sha256=([0-9a-f]{64})$")
_CHUNK = 1 << 20


def rows_altered(path: Path, table: str, rows: int, same_digest: bool, listed: int) -> ArchiveError:
    """The error for a table whose rows do not match the manifest."""
    return ArchiveError(
        f"{path}: table {table} holds {rows} rows whose checksum "
        f"{'matches' if same_digest else 'differs'}; the manifest says {listed} rows: the "
        "archive was altered"
    )


class MemberWriter:
    """Writes one member, hashing what goes in."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._hash = hashlib.sha256()
        self._buffer: list[bytes] = []
        self._buffered = 0
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered >= _CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            data = b"".join(self._buffer)
            self._hash.update(data)
            self._stream.write(data)
            self.bytes += len(data)
            self._buffer.clear()
            self._buffered = 0

    def finish(self) -> MemberEntry:
        self._flush()
        return MemberEntry(sha256=self._hash.hexdigest(), bytes=self.bytes)


class ArchiveWriter:
    """Writes an archive at ``path`` (through a temporary file renamed by
    :meth:`close`). Use as a context manager: leaving it with an exception deletes
    the temporary file."""

    def __init__(self, path: Path, *, compresslevel: int = 6) -> None:
        self.path = path
        self._tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        self._zip = zipfile.ZipFile(
            self._tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=compresslevel
        )
        self.members: dict[str, MemberEntry] = {}
        self._closed = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()

    @contextmanager
    def member(self, name: str) -> Iterator[MemberWriter]:
        """Write the member ``name``; its checksum is recorded when the block ends."""
        with self._zip.open(name, "w", force_zip64=True) as stream:
            writer = MemberWriter(stream)
            yield writer
            self.members[name] = writer.finish()

    def add_file(self, name: str, source: Path) -> MemberEntry:
        """Copy the file ``source`` in as the member ``name``."""
        with self.member(name) as out, source.open("rb") as src:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
        return self.members[name]

    def close(self, manifest: Manifest) -> Path:
        """Write the manifest and the comment that proves it, close, and move the
        archive to its final path."""
        data = manifest.model_dump_json(indent=2).encode("utf-8") + b"\n"
        self._zip.writestr(MANIFEST, data)
        digest = hashlib.sha256(data).hexdigest().encode("ascii")
        self._zip.comment = (_COMMENT % FORMAT_VERSION) + digest
        self._zip.close()
        self._closed = True
        with self._tmp.open("rb") as f:
            os.fsync(f.fileno())
        self._tmp.replace(self.path)
        return self.path

    def abort(self) -> None:
        """Forget the archive: close and delete the temporary file."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError, ValueError, zipfile.BadZipFile):
                self._zip.close()
        self._tmp.unlink(missing_ok=True)


class ArchiveReader:
    """Opens an archive and checks its container and manifest (not yet the members:
    see :meth:`check_members`). Raises :class:`ArchiveError` saying what is wrong."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.is_file():
            raise ArchiveError(f"no archive at {path}: check the path")
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise ArchiveError(
                f"{path} is not a meshgate archive, or it is truncated ({exc}): its zip "
                "directory, which is written last, is missing or damaged. Use an intact "
                "copy, or take the backup again"
            ) from None
        try:
            self.manifest = self._read_manifest()
            self._check_listing()
        except BaseException:
            self._zip.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()

    def _read_manifest(self) -> Manifest:
        found = _COMMENT_RE.match(self._zip.comment)
        if found is None and self._zip.comment.startswith(b"meshgate-backup/"):
            raise ArchiveError(
                f"{self.path} is truncated, or its end was altered: the manifest's checksum "
                "at the end of the file is cut short. Use an intact copy, or take the backup "
                "again"
            )
        if found is None:
            raise ArchiveError(
                f"{self.path} is not a meshgate archive: its zip comment does not hold the "
                "manifest's checksum (a zip made by another tool, or the comment was altered)"
            )
        if int(found.group(1)) > FORMAT_VERSION:
            raise ArchiveError(
                f"{self.path} is in archive format {int(found.group(1))}, newer than this "
                f"meshgate reads ({FORMAT_VERSION}): upgrade meshgate to restore it"
            )
        try:
            data = self._zip.read(MANIFEST)
        except KeyError:
            raise ArchiveError(f"{self.path} has no {MANIFEST}: not a meshgate archive") from None
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
            raise ArchiveError(f"{self.path}: {MANIFEST} is damaged ({exc})") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != found.group(2).decode("ascii"):
            raise ArchiveError(
                f"{self.path}: {MANIFEST} was altered: its SHA-256 is {digest[:16]}..., the "
                f"archive records {found.group(2).decode()[:16]}...; use an intact copy"
            )
        try:
            manifest = Manifest.model_validate_json(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(document)'}: {e['msg']}"
                for e in exc.errors()[:5]
            )
            raise ArchiveError(
                f"{self.path}: {MANIFEST} is not a valid {FORMAT} manifest: {problems}"
            ) from None
        if manifest.format_version > FORMAT_VERSION:
            raise ArchiveError(
                f"{self.path} is in archive format {manifest.format_version}, newer than this "
                f"meshgate reads ({FORMAT_VERSION}): upgrade meshgate to restore it"
            )
        return manifest

    def _check_listing(self) -> None:
        names = {i.filename: i for i in self._zip.infolist()}
        names.pop(MANIFEST, None)
        listed = self.manifest.members
        missing = sorted(set(listed) - set(names))
        extra = sorted(set(names) - set(listed))
        if missing or extra:
            what = []
            if missing:
                what.append(f"missing {', '.join(missing)}")
            if extra:
                what.append(f"not in the manifest: {', '.join(extra)}")
            raise ArchiveError(f"{self.path} was altered: members {'; '.join(what)}")
        for name, entry in listed.items():
            if names[name].file_size != entry.bytes:
                raise ArchiveError(
                    f"{self.path} was altered: member {name} holds {names[name].file_size} "
                    f"bytes, the manifest says {entry.bytes}"
                )
        for table in self.manifest.tables:
            if table.member is not None and table.member not in listed:
                raise ArchiveError(
                    f"{self.path}: table {table.name!r} names member {table.member}, which "
                    "the archive does not hold"
                )

    def chunks(self, name: str) -> Iterator[bytes]:
        """The bytes of member ``name``, in chunks; raises :class:`ArchiveError` at the
        end (or on the way) when they do not match the manifest."""
        entry = self.manifest.members[name]
        digest = hashlib.sha256()
        size = 0
        try:
            with self._zip.open(name) as stream:
                while chunk := stream.read(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    yield chunk
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
            raise ArchiveError(
                f"{self.path}: member {name} is damaged ({exc}); use an intact copy"
            ) from None
        if size != entry.bytes or digest.hexdigest() != entry.sha256:
            raise ArchiveError(
                f"{self.path}: member {name} was altered: its SHA-256 or size differs from "
                "the manifest's; use an intact copy"
            )

    def lines(self, name: str) -> Iterator[bytes]:
        """The lines of member ``name`` (without newlines), checked as :meth:`chunks`."""
        rest = b""
        for chunk in self.chunks(name):
            parts = (rest + chunk).split(b"\n")
            rest = parts.pop()
            yield from parts
        if rest:
            yield rest

    def check_members(self, progress: Callable[[str, int], None] | None = None) -> None:
        """Read every member and compare it with the manifest (SHA-256 and size);
        ``progress(name, bytes)`` is called as bytes are read."""
        for name in self.manifest.members:
            for chunk in self.chunks(name):
                if progress is not None:
                    progress(name, len(chunk))

    def extract(self, name: str, dest: Path) -> Path:
        """Write member ``name`` to ``dest``, checked; returns ``dest``."""
        with dest.open("wb") as out:
            for chunk in self.chunks(name):
                out.write(chunk)
        return dest
