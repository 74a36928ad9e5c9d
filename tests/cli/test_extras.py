"""A plain ``pip install meshgate`` (a real venv with the core dependencies only, see
tests/venvs.py): each optional dependency that is missing ends the command in one
line naming the extra that brings it, never a traceback."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from meshgate.cli._extras import missing_extra, one_line
from meshgate.errors import ConfigError, ConfigIssue
from tests.venvs import Venv

pytestmark = pytest.mark.timeout(120)

TOKEN = "abcdefghijklmnopqrstuvwxyz012345"

APPS = {
    "with_redis_cache": (
        "from meshgate.data import Cache\nfrom meshgate.service import Service\n"
        "service = Service('r', cache=Cache('redis://127.0.0.1:6379/0'))\n"
    ),
    "with_postgres": (
        "from meshgate.data import Database\nfrom meshgate.service import Service\n"
        "service = Service('p', database=Database('postgresql://postgres@127.0.0.1/test'))\n"
    ),
    "with_mysql": (
        "from meshgate.data import Database\nfrom meshgate.service import Service\n"
        "service = Service('m', database=Database('mysql://root@127.0.0.1/test'))\n"
    ),
    "with_redis_registry": (
        "from meshgate.registry.redis import RedisRegistry\n"
        "from meshgate.service import Service\nservice = Service('x')\n"
    ),
    "with_psycopg": (
        "import psycopg\nfrom meshgate.service import Service\nservice = Service('y')\n"
    ),
}

GATEWAYS = {
    "registry.yaml": f"""\
        gateway:
          listen: 127.0.0.1:0
          admin: {{listen: 127.0.0.1:0, token: {TOKEN}}}
          registry: {{redis: "redis://127.0.0.1:6379/0", token: {TOKEN}}}
        routes: []
        """,
    "shared.yaml": f"""\
        gateway:
          listen: 127.0.0.1:0
          admin: {{listen: 127.0.0.1:0, token: {TOKEN}}}
        upstreams:
          a:
            endpoints: ["127.0.0.1:9"]
            health: {{active: {{path: /}}, shared: {{redis: "redis://127.0.0.1:6379/0"}}}}
        routes: [{{name: a, match: {{path_prefix: /}}, upstream: a}}]
        """,
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Apps and gateway configurations that need an optional dependency."""
    path = tmp_path_factory.mktemp("extras")
    for name, code in APPS.items():
        (path / f"{name}.py").write_text(code)
    for name, text in GATEWAYS.items():
        (path / name).write_text(textwrap.dedent(text))
    (path / "migrations").mkdir()
    (path / "migrations" / "env.py").write_text("")
    return path


@pytest.mark.parametrize(
    ("args", "extra"),
    [
        (["serve", "with_redis_cache:service"], "redis"),
        (["serve", "with_postgres:service"], "postgres"),
        (["serve", "with_mysql:service"], "mysql"),
        (["serve", "with_redis_registry:service"], "redis"),
        (["serve", "with_psycopg:service"], "postgres"),
        (["gateway", "registry.yaml"], "redis"),
        (["gateway", "shared.yaml"], "redis"),
        (["db", "upgrade", "with_postgres:service"], "postgres"),
        (
            ["db", "backup", "x", "--database-url", "postgresql://postgres@127.0.0.1/test"],
            "postgres",
        ),
        (["db", "backup", "x", "--database-url", "mysql://root@127.0.0.1/test"], "mysql"),
        (["db", "current", "with_redis_registry:service"], "redis"),
    ],
    ids=[
        "redis-cache",
        "postgres-database",
        "mysql-database",
        "redis-registry-import",
        "psycopg-import",
        "gateway-redis-registry",
        "gateway-shared-health",
        "db-upgrade-postgres",
        "db-backup-postgres",
        "db-backup-mysql",
        "db-current-redis-import",
    ],
)
def test_a_missing_extra_is_one_line_naming_it(
    core_venv: Venv, folder: Path, args: list[str], extra: str
) -> None:
    result = (
        core_venv.run(*args, "--migrations", "migrations", cwd=folder)
        if args[0] == "db"
        else core_venv.run(*args, cwd=folder)
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode in (1, 2), result
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert f"pip install 'meshgate[{extra}]'" in lines[0], lines[0]


def test_the_core_venv_lacks_every_optional_module(core_venv: Venv) -> None:
    assert {"sqlalchemy", "aiosqlite", "alembic"} <= core_venv.distributions
    assert not {"redis", "asyncpg", "psycopg", "asyncmy", "pymysql"} & core_venv.distributions


def test_missing_extra_reads_the_cause_chain() -> None:
    def build() -> None:
        try:
            import meshgate_not_installed_module  # type: ignore[import-not-found]  # noqa: F401
        except ModuleNotFoundError as exc:
            exc.name = "asyncmy.connection"
            raise RuntimeError("while building the engine") from exc

    with pytest.raises(RuntimeError) as info:
        build()
    assert missing_extra(info.value) == (
        "the asyncmy package is needed but not installed: pip install 'meshgate[mysql]'"
    )
    assert missing_extra(ModuleNotFoundError("x", name="yaml")) is None
    assert missing_extra(ValueError("nothing to do with imports")) is None


def test_one_line_of_a_single_problem() -> None:
    single = ConfigError([ConfigIssue("url", "needs asyncpg")], "database 'default'")
    assert one_line(single) == "database 'default': url: needs asyncpg"
    several = ConfigError([ConfigIssue("a", "x"), ConfigIssue("b", "y")], "f.yaml")
    assert one_line(several) == str(several)
