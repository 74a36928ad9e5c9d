"""The shop's users service on each real engine: its migrations, CRUD with 422 and
409, the cache-aside on real Redis, and outages of the database and of Redis
mid-request (503 naming the dependency, then recovery without a restart)."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from examples.shop.users.app import MIGRATIONS, create_service

from meshgate.data.migrations import upgrade
from meshgate.errors import ConfigError
from meshgate.events import migrations as event_migrations
from meshgate.service import Service, ServiceStartupError
from meshgate.service.testing import in_process, use_memory_bus
from tests.data.conftest import service_url, tcp_proxy

ENGINES = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.services),
    pytest.param("mariadb", id="mariadb", marks=pytest.mark.services),
]


def _fresh_database(engine: str, tmp_path: Path) -> Iterator[str]:
    """A new, empty database on ``engine`` for one test; dropped afterwards."""
    if engine == "sqlite":
        yield f"sqlite:///{tmp_path / 'users.db'}"
        return
    base = service_url(engine)
    name = f"shop_{uuid.uuid4().hex[:12]}"
    if engine == "postgresql":
        import psycopg

        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        try:
            yield base.rsplit("/", 1)[0] + f"/{name}"
        finally:
            with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    else:
        import pymysql

        conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="")
        try:
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE `{name}`")
            yield base.rsplit("/", 1)[0] + f"/{name}"
        finally:
            with conn.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
            conn.close()


def migrate(url: str) -> None:
    """The service's migrations and its event tables (as ``meshgate db upgrade``)."""
    upgrade(url, MIGRATIONS)
    event_migrations.upgrade(url)


def users_service(*args: Any, **options: Any) -> Service:
    """The users service with an in-memory bus: its users.created events stay in the test."""
    service = create_service(*args, **options)
    use_memory_bus(service)
    return service


@pytest.fixture(params=ENGINES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from _fresh_database(request.param, tmp_path)


@pytest.fixture
async def users(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    migrate(database_url)
    service = users_service(database_url, "memory://", cache_ttl=60)
    async with in_process(service) as client:
        yield client


async def test_crud(users: httpx.AsyncClient) -> None:
    created = await users.post("/users", json={"email": " Ada@Example.COM ", "name": "Ada"})
    assert created.status_code == 201, created.text
    ada = created.json()
    assert ada["email"] == "ada@example.com"
    stamp = datetime.fromisoformat(ada["created_at"])
    assert stamp.tzinfo is not None
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60

    fetched = await users.get(f"/users/{ada['id']}")
    assert fetched.json() == ada  # the same from the database and from the cache
    assert (await users.get(f"/users/{ada['id']}")).json() == ada

    grace = (await users.post("/users", json={"email": "grace@example.com", "name": "G"})).json()
    renamed = await users.patch(f"/users/{ada['id']}", json={"name": "Countess"})
    assert renamed.json()["name"] == "Countess"
    assert (await users.get(f"/users/{ada['id']}")).json()["name"] == "Countess"
    taken = await users.patch(f"/users/{grace['id']}", json={"email": "ADA@example.com"})
    assert taken.status_code == 409
    assert taken.json()["detail"] == "a user with email 'ada@example.com' already exists"

    assert (await users.delete(f"/users/{ada['id']}")).status_code == 204
    assert (await users.get(f"/users/{ada['id']}")).status_code == 404
    assert (await users.delete(f"/users/{ada['id']}")).status_code == 404
    assert (await users.patch(f"/users/{ada['id']}", json={"name": "x"})).status_code == 404


async def test_a_new_user_is_announced_once_through_the_outbox(database_url: str) -> None:
    import json

    from meshgate.service.testing import settle

    migrate(database_url)
    service = create_service(database_url, "memory://", cache_ttl=60)
    bus = use_memory_bus(service)
    async with in_process(service) as users:
        made = await users.post("/users", json={"email": "e@example.com", "name": "Eve"})
        assert made.status_code == 201
        duplicate = await users.post("/users", json={"email": "E@example.com", "name": "Eve"})
        assert duplicate.status_code == 409  # rolled back: no event either
        await settle(service)
    events = [json.loads(raw) for raw in bus.published("users.created")]
    assert [(e["type"], e["subject"], e["data"]) for e in events] == [
        (
            "users.created",
            str(made.json()["id"]),
            {"id": made.json()["id"], "email": "e@example.com", "name": "Eve"},
        )
    ]


async def test_validation_and_duplicates(users: httpx.AsyncClient) -> None:
    first = await users.post("/users", json={"email": "lin@example.com", "name": "Lin"})
    assert first.status_code == 201
    duplicate = await users.post("/users", json={"email": "LIN@example.com", "name": "Other"})
    assert duplicate.status_code == 409
    for body, field in [
        ({"email": "not-an-email", "name": "x"}, "email"),
        ({"email": "a@b.co", "name": ""}, "name"),
        ({"email": "a@b.co", "name": "x" * 101}, "name"),
        ({"email": "a@b.co"}, "name"),
        ({"email": "a@b.co", "name": "x", "admin": True}, "admin"),
    ]:
        response = await users.post("/users", json=body)
        assert response.status_code == 422, body
        assert response.headers["content-type"] == "application/problem+json"
        assert [e["loc"][-1] for e in response.json()["errors"]] == [field]
    assert (await users.get("/users/not-a-number")).status_code == 422
    assert (await users.get("/users", params={"limit": 0})).status_code == 422


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        # What a fuzzer found: integers past the columns' 32 bits were driver errors.
        ("/users/105828820558784692224", {}, ["path", "user_id"]),
        ("/users/2147483648", {}, ["path", "user_id"]),
        ("/users/0", {}, ["path", "user_id"]),
        ("/users", {"after": "444051663231111624329886613635072"}, ["query", "after"]),
        ("/users", {"after": "2147483648"}, ["query", "after"]),
    ],
)
async def test_ids_out_of_range_are_422(
    users: httpx.AsyncClient, path: str, params: dict[str, str], field: list[str]
) -> None:
    response = await users.get(path, params=params)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert [e["loc"] for e in response.json()["errors"]] == [field]
    assert (await users.patch(path, json={"name": "x"})).status_code in (405, 422)
    assert (await users.get("/users/2147483647")).status_code == 404  # the largest id is fine


async def test_control_characters_are_refused(users: httpx.AsyncClient) -> None:
    for body in (
        {"email": "a@b.co", "name": "nul\x00byte"},
        {"email": "a\x00@b.co", "name": "x"},
        {"email": "a@b.co", "name": "bell\x07"},
    ):
        response = await users.post("/users", json=body)
        assert response.status_code == 422, (body, response.text)


async def test_pagination(users: httpx.AsyncClient) -> None:
    for i in range(7):
        response = await users.post("/users", json={"email": f"p{i}@example.com", "name": "P"})
        assert response.status_code == 201
    seen: list[str] = []
    after = 0
    pages = 0
    while True:
        page = (await users.get("/users", params={"limit": 3, "after": after})).json()
        seen.extend(u["email"] for u in page["items"])
        pages += 1
        if page["next"] is None:
            break
        after = page["next"]
    assert seen == [f"p{i}@example.com" for i in range(7)]
    assert pages == 3


@pytest.mark.services
async def test_cache_aside_on_real_redis(tmp_path: Path) -> None:
    redis_url = service_url("redis")
    database_url = f"sqlite:///{tmp_path / 'users.db'}"
    migrate(database_url)
    prefix = f"test-users-{uuid.uuid4().hex[:8]}:"
    service = users_service(database_url, redis_url, cache_ttl=30, cache_prefix=prefix)
    plain = redis.Redis.from_url(redis_url)
    try:
        async with in_process(service) as users:
            user = (await users.post("/users", json={"email": "r@example.com", "name": "R"})).json()
            key = f"{prefix}user:{user['id']}"
            assert plain.get(key) is None
            assert (await users.get(f"/users/{user['id']}")).status_code == 200
            assert plain.get(key) is not None
            ttl = plain.ttl(key)
            assert isinstance(ttl, int)
            assert 0 < ttl <= 33  # 30 s, plus jitter
            # A second instance sharing Redis sees the update at once: the write
            # dropped the one shared entry.
            other = users_service(database_url, redis_url, cache_ttl=30, cache_prefix=prefix)
            async with in_process(other) as second:
                await second.patch(f"/users/{user['id']}", json={"name": "Renamed"})
                assert plain.get(key) is None
            assert (await users.get(f"/users/{user['id']}")).json()["name"] == "Renamed"
            # A miss is not cached: a 404 then a create does not hide the new user.
            assert (await users.get("/users/999")).status_code == 404
            assert plain.get(f"{prefix}user:999") is None
    finally:
        for key in plain.scan_iter(f"{prefix}*"):
            plain.delete(key)
        plain.close()


@pytest.mark.services
async def test_database_outage_is_a_503_then_recovers(tmp_path: Path) -> None:
    service_url("postgresql")
    for url in _fresh_database("postgresql", tmp_path):
        migrate(url)
        async with tcp_proxy(5432) as proxy:
            proxied = url.replace(":5432/", f":{proxy.port}/")
            service = users_service(proxied, "memory://", cache_ttl=0.01)
            async with in_process(service) as users:
                made = await users.post("/users", json={"email": "o@example.com", "name": "O"})
                assert made.status_code == 201
                proxy.cut()
                down = await users.post("/users", json={"email": "d@example.com", "name": "D"})
                assert down.status_code == 503
                body = down.json()
                assert down.headers["content-type"] == "application/problem+json"
                assert body["error"] == "dependency_unavailable"
                assert body["dependency"] == "database"
                assert "users" in body["detail"]
                ready = await users.get("/health/ready")
                assert ready.status_code == 503
                assert ready.json()["checks"]["database"]["ok"] is False
                assert ready.json()["checks"]["cache"]["ok"] is True
                proxy.restore()
                again = await users.post("/users", json={"email": "d@example.com", "name": "D"})
                assert again.status_code == 201, again.text
                assert (await users.get("/health/ready")).status_code == 200


@pytest.mark.services
async def test_redis_outage_degrades_reads_and_keeps_writes(tmp_path: Path) -> None:
    service_url("redis")
    database_url = f"sqlite:///{tmp_path / 'users.db'}"
    migrate(database_url)
    prefix = f"test-users-{uuid.uuid4().hex[:8]}:"
    async with tcp_proxy(6379) as proxy:
        cache_url = f"redis://127.0.0.1:{proxy.port}/0"
        service = users_service(database_url, cache_url, cache_ttl=30, cache_prefix=prefix)
        async with in_process(service) as users:
            user = (await users.post("/users", json={"email": "c@example.com", "name": "C"})).json()
            proxy.cut()
            # Reads fall back to the database; a write commits and says nothing of
            # the cache it could not reach.
            assert (await users.get(f"/users/{user['id']}")).status_code == 200
            renamed = await users.patch(f"/users/{user['id']}", json={"name": "Still"})
            assert renamed.status_code == 200
            ready = await users.get("/health/ready")
            assert ready.status_code == 503
            assert ready.json()["checks"]["cache"]["ok"] is False
            proxy.restore()
            assert (await users.get("/health/ready")).status_code == 200
            assert (await users.get(f"/users/{user['id']}")).json()["name"] == "Still"
    plain = redis.Redis.from_url(service_url("redis"))
    for key in plain.scan_iter(f"{prefix}*"):
        plain.delete(key)
    plain.close()


async def test_a_deleted_database_is_named_then_refused_or_migrated_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 11: deleting .meshgate/data/ while the shop runs (the README's way to
    start empty) used to go unnoticed, then give plain-text 500s after a restart."""
    monkeypatch.delenv("MESHGATE_MIGRATE", raising=False)
    data = tmp_path / ".meshgate" / "data"
    data.mkdir(parents=True)
    url = f"sqlite:///{data / 'users.db'}"
    migrate(url)
    async with in_process(create_service(url, "memory://")) as users:
        made = await users.post("/users", json={"email": "a@example.com", "name": "A"})
        assert made.status_code == 201
        shutil.rmtree(data)
        ready = await users.get("/health/ready")
        assert ready.status_code == 503
        assert "was deleted" in ready.json()["checks"]["database"]["error"]
        lost = await users.post("/users", json={"email": "b@example.com", "name": "B"})
        assert lost.status_code == 503, lost.text  # not a 201 into the deleted file
        assert lost.headers["content-type"] == "application/problem+json"
        assert "was deleted" in lost.json()["detail"]

    # A restart without the folder: a clear configuration error.
    with pytest.raises(ConfigError, match="does not exist"):
        create_service(url, "memory://")
    # With the folder back (meshgate up makes it), but nothing migrated: a refusal.
    data.mkdir(parents=True)
    with pytest.raises(ServiceStartupError, match="has no schema revision") as caught:
        async with in_process(create_service(url, "memory://")):
            pass
    assert "meshgate db upgrade" in str(caught.value)
    # A service that may migrate (MESHGATE_MIGRATE=1) starts empty, migrated again.
    monkeypatch.setenv("MESHGATE_MIGRATE", "1")
    async with in_process(create_service(url, "memory://")) as users:
        assert (await users.get("/health/ready")).status_code == 200
        again = await users.post("/users", json={"email": "a@example.com", "name": "A"})
        assert again.status_code == 201
        assert (await users.get("/users")).json()["items"] == [again.json()]
