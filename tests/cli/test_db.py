"""Where ``meshgate db backup`` puts archives when not told: in ``.meshgate/backups``
of the system, which git ignores, never loose in the source tree."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meshgate.cli import app

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="checks with git")


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git repository holding a system (meshgate.yaml) with a SQLite database."""
    monkeypatch.delenv("MESHGATE_FILE", raising=False)
    monkeypatch.delenv("MESHGATE_DATABASE_URL", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    with sqlite3.connect(tmp_path / "bank.db") as conn:
        conn.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER)")
        conn.executemany("INSERT INTO accounts (balance) VALUES (?)", [(10,), (20,)])
    (tmp_path / "meshgate.yaml").write_text(
        f"name: shop\nservices:\n  bank:\n    command: sleep 100\n"
        f"    database: sqlite:///{tmp_path / 'bank.db'}\n"
    )
    (tmp_path / "src").mkdir()
    monkeypatch.chdir(tmp_path / "src")
    return tmp_path


def untracked(repo: Path) -> list[str]:
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    return sorted(line[3:] for line in status.stdout.splitlines())


def test_a_backup_goes_to_the_system_s_state_folder(repo: Path) -> None:
    before = untracked(repo)
    url = f"sqlite:///{repo / 'bank.db'}"
    result = CliRunner().invoke(app, ["db", "backup", "bank", "--database-url", url])
    assert result.exit_code == 0, result.output
    archives = list((repo / ".meshgate" / "backups").glob("bank-*.mgbak"))
    assert len(archives) == 1, list(repo.rglob("*.mgbak"))
    assert f"to {archives[0]} (" in result.stdout
    assert untracked(repo) == before  # ignored by git


def test_backup_all_goes_to_the_system_s_state_folder(repo: Path) -> None:
    before = untracked(repo)
    result = CliRunner().invoke(app, ["db", "backup", "--all", "-f", str(repo / "meshgate.yaml")])
    assert result.exit_code == 0, result.output
    (folder,) = (repo / ".meshgate" / "backups").glob("shop-*")
    assert sorted(p.name for p in folder.iterdir()) == ["bank.mgbak", "index.json"]
    assert untracked(repo) == before


def test_without_a_system_the_backup_goes_to_meshgate_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MESHGATE_DATABASE_URL", raising=False)
    with sqlite3.connect(tmp_path / "one.db") as conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    url = f"sqlite:///{tmp_path / 'one.db'}"
    result = CliRunner().invoke(app, ["db", "backup", "one", "--database-url", url])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / ".meshgate" / "backups").glob("one-*.mgbak"))) == 1
    assert (tmp_path / ".meshgate" / ".gitignore").read_text().splitlines()[-1] == "*"
