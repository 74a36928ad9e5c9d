"""``meshgate db``: how SERVICE resolves, the commands end to end on SQLite, and the
errors that say what is missing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meshgate.cli.db import app
from tests.data.conftest import unique


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    monkeypatch.delenv("MESHGATE_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # a module SERVICE adds the cwd to it
    return CliRunner()


def test_a_plain_service_name(runner: CliRunner, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'users.db'}"
    result = runner.invoke(app, ["init", "users"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "services/users/migrations/env.py").is_file()

    result = runner.invoke(app, ["revision", "users", "-m", "first"])
    assert result.exit_code == 0, result.output
    assert "wrote revision" in result.stdout
    first = next((tmp_path / "services/users/migrations/versions").glob("*_first.py"))
    revision = first.name.split("_")[1]

    result = runner.invoke(app, ["current", "users", "--database-url", url])
    assert result.exit_code == 0, result.output
    assert "at revision base (behind head" in result.stdout

    result = runner.invoke(app, ["upgrade", "users"], env={"MESHGATE_DATABASE_URL": url})
    assert result.exit_code == 0, result.output
    assert f"at revision {revision}" in result.stdout

    result = runner.invoke(app, ["current", "users", "--database-url", url])
    assert result.exit_code == 0, result.output
    assert f"{revision} (head)" in result.stdout

    result = runner.invoke(app, ["history", "users"])
    assert result.exit_code == 0, result.output
    assert f"base -> {revision} (head): first" in result.stdout

    result = runner.invoke(app, ["downgrade", "users", "--to", "base", "--database-url", url])
    assert result.exit_code == 0, result.output
    assert "at revision base" in result.stdout


def test_a_module_with_its_database_metadata_and_migrations(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = unique("svc")
    table = unique("accounts")
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "app.py").write_text(
        "from sqlalchemy import Column, Integer, MetaData, Table\n"
        "from prometheus_client import CollectorRegistry\n"
        "from meshgate.data import Database\n"
        "from types import SimpleNamespace\n"
        f"db = Database('sqlite:///{tmp_path / 'svc.db'}', registry=CollectorRegistry())\n"
        "service = SimpleNamespace(database=db)  # as a meshgate Service holds it\n"
        "metadata = MetaData()\n"
        f"Table('{table}', metadata, Column('id', Integer, primary_key=True))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    service = f"{package}.app"
    try:
        result = runner.invoke(app, ["init", service])
        assert result.exit_code == 0, result.output
        folder = tmp_path / package / "migrations"
        assert (folder / "env.py").is_file()

        result = runner.invoke(app, ["revision", service, "-m", "accounts", "--autogenerate"])
        assert result.exit_code == 0, result.output
        script = next((folder / "versions").glob("*_accounts.py")).read_text()
        assert f"op.create_table('{table}'" in script

        result = runner.invoke(app, ["upgrade", service])
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, ["current", service])
        assert "(head)" in result.stdout
        result = runner.invoke(app, ["current", f"{service}:service"])
        assert "(head)" in result.stdout
    finally:
        for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
            del sys.modules[name]


def test_a_module_that_makes_clients_at_import(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/services.md's pattern, ``users = service.client("users")`` at module level,
    imports without a registry: the database commands never call it."""
    monkeypatch.delenv("MESHGATE_REGISTRY_URL", raising=False)
    package = unique("svc")
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "app.py").write_text(
        "from prometheus_client import CollectorRegistry\n"
        "from meshgate.data import Database\n"
        "from meshgate.service import Service\n"
        f"db = Database('sqlite:///{tmp_path / 'orders.db'}', registry=CollectorRegistry())\n"
        "service = Service('orders', database=db)\n"
        "users = service.client('users')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    service = f"{package}.app"
    try:
        for args in (["init", service], ["revision", service, "-m", "first"], ["upgrade", service]):
            result = runner.invoke(app, args)
            assert result.exit_code == 0, result.output
        assert "at revision " in result.stdout
    finally:
        for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
            del sys.modules[name]


def test_what_is_missing_is_named(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["upgrade", "users", "--database-url", "sqlite:///x.db"])
    assert result.exit_code == 2
    assert "no migrations folder for service 'users' at services/users/migrations" in result.stderr
    assert "meshgate db init users" in result.stderr
    assert "Traceback" not in result.output

    runner.invoke(app, ["init", "users"])
    result = runner.invoke(app, ["upgrade", "users"])
    assert result.exit_code == 2
    assert "--database-url" in result.stderr
    assert "MESHGATE_DATABASE_URL" in result.stderr

    result = runner.invoke(app, ["current", "no_such_pkg_x.app"])
    assert result.exit_code == 2
    assert "cannot be imported" in result.stderr

    result = runner.invoke(app, ["upgrade", "users", "--database-url", "oracle://h/db"])
    assert result.exit_code == 1
    assert "unsupported database 'oracle'" in result.stderr

    result = runner.invoke(app, ["init", "users"])
    assert result.exit_code == 1
    assert "exists and is not empty" in result.stderr

    result = runner.invoke(app, ["downgrade", "users"])
    assert result.exit_code == 2  # --to is required
