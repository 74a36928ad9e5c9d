"""``meshgate db backup``, ``restore`` and ``verify`` through the CLI: output, --json,
exit codes (0 done, 1 refused or failed, 2 a SERVICE or file that does not resolve),
and ``backup --all`` over a system file."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meshgate.cli.db import app
from meshgate.data.backup import CONSISTENCY_STATEMENT
from tests.data.backup.conftest import TOTAL, NewDatabase, bank_total, make_bank


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    monkeypatch.delenv("MESHGATE_DATABASE_URL", raising=False)
    monkeypatch.delenv("MESHGATE_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return CliRunner()


def test_backup_verify_restore_with_json(
    runner: CliRunner, new_database: NewDatabase, tmp_path: Path
) -> None:
    source = new_database("sqlite")
    make_bank(source)
    result = runner.invoke(app, ["backup", "bank", "--database-url", source, "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["format"] == "meshgate-backup"
    assert manifest["service"]["name"] == "bank"
    assert manifest["source"]["engine"] == "sqlite"
    assert manifest["outbox"] is None
    assert manifest["migrations"] == {
        "revision": None,
        "version_table": "alembic_version",
        "lineage": [],
    }
    assert [(t["name"], t["rows"]) for t in manifest["tables"]] == [
        ("checking", 1500),
        ("savings", 1500),
    ]
    assert manifest["duration_s"] >= 0
    archives = list((tmp_path / ".meshgate" / "backups").glob("bank-*.mgbak"))
    assert len(archives) == 1

    result = runner.invoke(app, ["verify", str(archives[0])])
    assert result.exit_code == 0, result.output
    assert "ok: bank, sqlite" in result.stdout
    assert "rows of 2 table(s): count and checksum" in result.stdout

    target = new_database("sqlite")
    result = runner.invoke(
        app, ["restore", "bank", str(archives[0]), "--database-url", target, "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["rows"] == 3000
    assert all(t["verified"] for t in report["tables"])
    assert bank_total(target) == (TOTAL, 1500, 1500)

    result = runner.invoke(
        app, ["restore", "bank", str(archives[0]), "--database-url", target, "--json"]
    )
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {
        "ok": False,
        "error": result.stderr.removeprefix("error: ").strip().replace("\n", " ")
        if "\n" in result.stderr.strip()
        else result.stderr.removeprefix("error: ").strip(),
        "kind": "TargetNotEmptyError",
    }
    result = runner.invoke(
        app, ["restore", "bank", str(archives[0]), "--database-url", target, "--force"]
    )
    assert result.exit_code == 0, result.output
    assert "verified: every table's row count and checksum match the archive" in result.stdout


def test_exit_codes_and_messages(
    runner: CliRunner, new_database: NewDatabase, tmp_path: Path
) -> None:
    source = new_database("sqlite")
    make_bank(source)
    archive = tmp_path / "bank.mgbak"
    assert (
        runner.invoke(
            app, ["backup", "bank", "-o", str(archive), "--database-url", source]
        ).exit_code
        == 0
    )

    cases = [
        (["backup", "bank"], 2, "no database URL for service 'bank'"),
        (["backup"], 2, "name one SERVICE"),
        (["backup", "no_such_pkg.app"], 2, "cannot be imported"),
        (["verify", "missing.mgbak"], 2, "no archive at missing.mgbak"),
        (["restore", "bank", "missing.mgbak", "--database-url", source], 2, "no archive at"),
        (
            ["restore", "orders", str(archive), "--database-url", new_database("sqlite")],
            1,
            "a backup of service 'bank', not 'orders'",
        ),
        (["backup", "bank", "--database-url", "sqlite://"], 2, "in-memory SQLite database"),
        (["backup", "bank", "--database-url", "oracle://x/y"], 2, "not 'oracle'"),
        (
            ["backup", "bank", "--database-url", f"sqlite:///{tmp_path}/none.db"],
            1,
            "no SQLite database at",
        ),
    ]
    for args, code, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == code, (args, result.output)
        assert message in result.stderr, (args, result.stderr)

    archive.write_bytes(archive.read_bytes()[:-10])
    result = runner.invoke(app, ["verify", str(archive), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["kind"] == "ArchiveError"
    assert "truncated" in result.stderr


def test_backup_all_services_of_a_system(
    runner: CliRunner, new_database: NewDatabase, tmp_path: Path
) -> None:
    bank_url = new_database("sqlite")
    make_bank(bank_url)
    embedded = tmp_path / ".meshgate" / "data" / "ledger.db"
    embedded.parent.mkdir(parents=True)
    with sqlite3.connect(embedded) as conn:
        conn.execute("CREATE TABLE entries (id INTEGER PRIMARY KEY, amount INTEGER)")
        conn.execute("CREATE TABLE ledger_outbox (id INTEGER PRIMARY KEY, payload TEXT)")
        conn.executemany("INSERT INTO ledger_outbox (payload) VALUES (?)", [("a",), ("b",)])
    (tmp_path / "meshgate.yaml").write_text(
        "name: shop\n"
        "services:\n"
        f"  bank:\n    command: sleep 100\n    database: {bank_url}\n"
        "  ledger:\n    command: [sleep, '100']\n    database: embedded\n"
        "  web:\n    command: sleep 100\n"
    )
    result = runner.invoke(app, ["backup", "--all", "-o", "out", "--json"])
    assert result.exit_code == 0, result.output
    index = json.loads(result.stdout)
    assert index == json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["system"] == "shop"
    assert index["consistency"] == CONSISTENCY_STATEMENT
    services = {s["name"]: s for s in index["services"]}
    assert services["web"] == {
        "name": "web",
        "ref": "web",
        "status": "skipped",
        "reason": "it has no database in the system file",
    }
    assert services["bank"]["status"] == "ok"
    assert services["bank"]["rows"] == 3000
    assert services["ledger"]["outbox"] == {"table": "ledger_outbox", "column": "id", "position": 2}
    assert services["bank"]["taken_at"] < services["ledger"]["taken_at"]  # one after the other
    for name in ("bank", "ledger"):
        verified = runner.invoke(app, ["verify", str(tmp_path / "out" / f"{name}.mgbak")])
        assert verified.exit_code == 0, verified.output

    # Some services only; an unknown one is named.
    result = runner.invoke(app, ["backup", "--all", "ledger", "-o", "only"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "only").iterdir()) == ["index.json", "ledger.mgbak"]
    assert "different instants" in result.stderr
    result = runner.invoke(app, ["backup", "--all", "nope"])
    assert result.exit_code == 2
    assert "has no service nope; it has bank, ledger, web" in result.stderr
