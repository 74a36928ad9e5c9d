"""Bad archives are refused with a message that says what is wrong, and the target
is left untouched: truncated, altered data, altered manifest, a member too many,
and files that are not archives at all."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from meshgate.data.backup import ArchiveError, backup, restore, verify
from meshgate.data.backup.archive import MANIFEST
from tests.data.backup.conftest import NewDatabase, make_bank


@pytest.fixture
def archive(new_database: NewDatabase, tmp_path: Path) -> Path:
    source = new_database("sqlite")
    make_bank(source)
    path = tmp_path / "bank.mgbak"
    backup(source, path, service="bank")
    return path


def _rewrite(
    path: Path,
    change: Callable[[str, bytes], bytes | None],
    *,
    fix_comment: bool = False,
    extra: dict[str, bytes] | None = None,
) -> None:
    """Rewrite the zip with each member's bytes passed through ``change`` (None drops
    it); ``fix_comment`` recomputes the manifest checksum, as a careful forger would."""
    with zipfile.ZipFile(path) as src:
        members = [(i.filename, src.read(i.filename)) for i in src.infolist()]
        comment = src.comment
    members += list((extra or {}).items())
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for name, data in members:
            changed = change(name, data)
            if changed is None:
                continue
            dst.writestr(name, changed)
            if name == MANIFEST and fix_comment:
                digest = hashlib.sha256(changed).hexdigest().encode()
                comment = comment.rsplit(b"=", 1)[0] + b"=" + digest
        dst.comment = comment


def _manifest(edit: Callable[[dict], None]) -> Callable[[str, bytes], bytes]:
    def change(name: str, data: bytes) -> bytes:
        if name != MANIFEST:
            return data
        doc = json.loads(data)
        edit(doc)
        return json.dumps(doc).encode()

    return change


def _data(edit: Callable[[bytes], bytes]) -> Callable[[str, bytes], bytes]:
    return lambda name, data: edit(data) if name.startswith("tables/0001") else data


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 200])


def _flip_compressed_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(next(n for n in z.namelist() if n.startswith("tables/0001")))
    middle = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    data[middle] ^= 0xFF
    path.write_bytes(bytes(data))


def _change_a_row(path: Path) -> None:
    """Alter a balance and record the altered member's SHA-256 and the manifest's:
    only the rows' own checksum can tell."""
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.startswith("tables/0001"))
        altered = z.read(name).replace(b'[1,"owner 1",100]', b'[1,"owner 1",999]')

    def change(member: str, data: bytes) -> bytes:
        if member == name:
            return altered
        edit = _manifest(
            lambda d: d["members"][name].update(sha256=hashlib.sha256(altered).hexdigest())
        )
        return edit(member, data)

    _rewrite(path, change, fix_comment=True)


CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("truncated", _truncate, r"not a meshgate archive, or it is truncated"),
    ("flipped byte", _flip_compressed_byte, r"member tables/0001-checking.jsonl is damaged"),
    (
        "manifest edited",
        lambda p: _rewrite(p, _manifest(lambda d: d["tables"][0].update(rows=1))),
        r"manifest.json was altered: its SHA-256",
    ),
    (
        "manifest edited and its checksum forged",
        lambda p: _rewrite(p, _manifest(lambda d: d["tables"][0].update(rows=1)), fix_comment=True),
        r"table checking holds 1500 rows whose checksum matches; the manifest says 1 rows",
    ),
    (
        "a row changed, member checksum forged",
        _change_a_row,
        r"table checking holds 1500 rows whose checksum differs",
    ),
    (
        "a row dropped",
        lambda p: _rewrite(p, _data(lambda d: d.split(b"\n", 1)[1])),
        r"member tables/0001-checking.jsonl holds \d+ bytes, the manifest says",
    ),
    (
        "a member added",
        lambda p: _rewrite(p, lambda _n, d: d, extra={"tables/9999-evil.jsonl": b"[1]\n"}),
        r"members not in the manifest: tables/9999-evil.jsonl",
    ),
    (
        "not a zip",
        lambda p: p.write_bytes(b"hello, I am not an archive\n" * 10),
        r"not a meshgate archive",
    ),
    (
        "a zip of another tool",
        lambda p: zipfile.ZipFile(p, "w").close(),
        r"not a meshgate archive: its zip comment",
    ),
    (
        "a newer archive format",
        lambda p: _rewrite(p, _manifest(lambda d: d.update(format_version=2)), fix_comment=True),
        r"in archive format 2, newer than this meshgate reads \(1\): upgrade meshgate",
    ),
]


@pytest.mark.parametrize(("damage", "message"), [pytest.param(c[1], c[2], id=c[0]) for c in CASES])
def test_a_bad_archive_is_refused_before_the_target_is_touched(
    archive: Path,
    new_database: NewDatabase,
    damage: Callable[[Path], None],
    message: str,
) -> None:
    verify(archive)  # sound before the damage
    damage(archive)
    with pytest.raises(ArchiveError, match=message):
        verify(archive)
    target = new_database("sqlite")
    with pytest.raises(ArchiveError, match=message):
        restore(target, archive, service="bank")
    assert not Path(target.removeprefix("sqlite:///")).exists()  # not even created


def test_a_bad_archive_leaves_an_existing_target_as_it_was(
    archive: Path, new_database: NewDatabase
) -> None:
    target = new_database("sqlite")
    make_bank(target)
    path = Path(target.removeprefix("sqlite:///"))
    with sqlite3.connect(path) as conn:
        before = conn.execute("SELECT SUM(balance), COUNT(*) FROM checking").fetchone()
    _flip_compressed_byte(archive)
    with pytest.raises(ArchiveError):
        restore(target, archive, service="bank", force=True)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT SUM(balance), COUNT(*) FROM checking").fetchone() == before


def test_a_failed_restore_rolls_back_everything(
    archive: Path, new_database: NewDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure after the schema was made and rows loaded (here: the check after
    loading) leaves a forced target as it was, its old tables included."""
    from meshgate.data.backup import RestoreVerificationError, _restore

    target = new_database("sqlite")
    make_bank(target)

    def wrong(*_args: object, **_kwargs: object) -> None:
        raise RestoreVerificationError("the restored data does not match the archive (test)")

    monkeypatch.setattr(_restore, "verify_target", wrong)
    with pytest.raises(RestoreVerificationError):
        restore(target, archive, service="bank", force=True)
    from tests.data.backup.conftest import bank_total

    assert bank_total(target) == (300_000, 1500, 1500)


def test_a_value_that_does_not_decode_is_named(archive: Path, new_database: NewDatabase) -> None:
    """A forger who recomputes every checksum still cannot make a restore load a value
    that is not of its column's type: the line and column are named."""
    with zipfile.ZipFile(archive) as z:
        name = next(n for n in z.namelist() if n.startswith("tables/0001"))
        altered = z.read(name).replace(b'[7,"owner 7",100]', b'[7,"owner 7","lots"]')
    from meshgate.data.backup.codec import Digest

    digest = Digest()
    for line in altered.split(b"\n")[:-1]:
        digest.add(line)

    def change(member: str, data: bytes) -> bytes:
        if member == name:
            return altered

        def edit(doc: dict) -> None:
            doc["members"][name]["sha256"] = hashlib.sha256(altered).hexdigest()
            doc["members"][name]["bytes"] = len(altered)
            doc["tables"][0]["digest"] = digest.hexdigest()

        return _manifest(edit)(member, data)

    _rewrite(archive, change, fix_comment=True)
    verify(archive)  # consistent with itself
    target = new_database("sqlite")
    with pytest.raises(
        ArchiveError, match=r"line 7, column balance: 'lots' is not a valid integer"
    ):
        restore(target, archive, service="bank")
    assert not Path(target.removeprefix("sqlite:///")).exists()
