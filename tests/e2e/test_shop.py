"""The reference shop end to end, on SQLite with nothing else running: a gateway
(hosting the registry), two ``users`` instances and one ``web`` instance, each a
real process on loopback; JWT on writes; instances joining and leaving under load.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import yaml

from tests.e2e.conftest import TOKEN, Gateway, GatewayFactory, tail

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
SHOP = ROOT / "examples" / "shop"
SECRET = "shop-e2e-service-secret-0123456789abcdef"
READY = re.compile(r"(?P<name>\w+) on http://127\.0\.0\.1:(?P<port>\d+)")


def demo_token(config: dict[str, Any], subject: str = "alice") -> str:
    """A JWT the shop's users-write route accepts (its demo HS256 key)."""
    route = next(r for r in config["routes"] if r["name"] == "users-write")
    jwt_settings = route["auth"]["jwt"]
    now = int(time.time())
    claims = {"sub": subject, "iss": jwt_settings["issuer"], "iat": now, "exp": now + 300}
    return jwt.encode(claims, jwt_settings["keys"][0]["secret"], algorithm="HS256")


@dataclass
class Instance:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def served(self) -> float:
        """Requests this instance answered on its API routes (from its /metrics)."""
        text = httpx.get(f"http://{self.address}/metrics", timeout=5).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("meshgate_service_requests_total{")
            and "/health" not in line
            and "/metrics" not in line
        )


@dataclass
class Shop:
    gateway: Gateway
    config: dict[str, Any]
    tmp: Path
    env: dict[str, str]
    instances: list[Instance] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.gateway.url

    def start(self, name: str) -> Instance:
        log = self.tmp / f"{name}-{len(self.instances)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "meshgate", "serve", f"examples.shop.{name}.app:service"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=ROOT,
            )
        instance = Instance(name, proc, log)
        self.instances.append(instance)
        deadline = time.monotonic() + 20
        while (match := READY.search(log.read_text(errors="replace"))) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{name} did not start:\n{tail(log)}")
            time.sleep(0.05)
        instance.port = int(match["port"])
        return instance

    def registered(self, service: str) -> set[str]:
        res = self.gateway.admin("GET", f"/v1/registry/services/{service}")
        assert res.status_code == 200, res.text
        return {i["address"] for i in res.json()["instances"]}

    def wait_registered(self, service: str, addresses: set[str], timeout: float = 15) -> float:
        """Wait until the registry lists exactly ``addresses``; the time it took."""
        started = time.monotonic()
        while (now := self.registered(service)) != addresses:
            if time.monotonic() - started > timeout:
                logs = "\n".join(f"--- {i.name}:\n{tail(i.log)}" for i in self.instances)
                pytest.fail(f"{service}: registered {now}, expected {addresses}\n{logs}")
            time.sleep(0.02)
        return time.monotonic() - started

    def stop(self, instance: Instance, sig: int = signal.SIGTERM) -> None:
        if instance.proc.poll() is None:
            instance.proc.send_signal(sig)
        instance.proc.wait(30)


@pytest.fixture
def shop(start_gateway: GatewayFactory, tmp_path: Path) -> Iterator[Shop]:
    config = yaml.safe_load((SHOP / "gateway.yaml").read_text())
    config["gateway"]["listen"] = "127.0.0.1:0"
    config["gateway"]["admin"] = {"listen": "127.0.0.1:0", "token": TOKEN}
    gateway = start_gateway(yaml.safe_dump(config), workers=1)
    database = tmp_path / "users.db"
    registry_token = (tmp_path / ".meshgate" / f"registry-{gateway.admin_port}.token").read_text()
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "PYTHONUNBUFFERED": "1",
        "USERS_DATABASE_URL": f"sqlite:///{database}",
        "MESHGATE_REGISTRY_URL": gateway.admin_url,
        "MESHGATE_REGISTRY_TOKEN": registry_token.strip(),
        "MESHGATE_SERVICE_SECRET": SECRET,
        "SHOP_DEMO_TOKEN_SECRET": next(r for r in config["routes"] if r["name"] == "users-write")[
            "auth"
        ]["jwt"]["keys"][0]["secret"],
    }
    migrate = subprocess.run(
        [sys.executable, "-m", "meshgate", "db", "upgrade", "examples.shop.users.app"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    shop = Shop(gateway, config, tmp_path, env)
    try:
        first, second = shop.start("users"), shop.start("users")
        web = shop.start("web")
        shop.wait_registered("users", {first.address, second.address})
        shop.wait_registered("web", {web.address})
        yield shop
    finally:
        for instance in shop.instances:
            with contextlib.suppress(subprocess.TimeoutExpired):
                shop.stop(instance)
            if instance.proc.poll() is None:
                instance.proc.kill()
                instance.proc.wait(10)


def test_users_crud_through_the_gateway(shop: Shop) -> None:
    auth = {"Authorization": f"Bearer {demo_token(shop.config)}"}
    with httpx.Client(base_url=shop.url, timeout=10) as client:
        anonymous = client.post("/api/users", json={"email": "ada@example.com", "name": "Ada"})
        assert anonymous.status_code == 401, anonymous.text

        created = client.post(
            "/api/users", json={"email": "Ada@Example.com", "name": "Ada Lovelace"}, headers=auth
        )
        assert created.status_code == 201, created.text
        user = created.json()
        assert user["email"] == "ada@example.com"
        assert created.headers["location"] == f"/users/{user['id']}"

        duplicate = client.post(
            "/api/users", json={"email": "ada@example.com", "name": "Ada"}, headers=auth
        )
        assert duplicate.status_code == 409
        assert "already exists" in duplicate.json()["detail"]

        invalid = client.post("/api/users", json={"email": "nope", "name": ""}, headers=auth)
        assert invalid.status_code == 422
        assert invalid.headers["content-type"] == "application/problem+json"
        fields = {tuple(e["loc"]) for e in invalid.json()["errors"]}
        assert fields == {("body", "email"), ("body", "name")}

        fetched = client.get(f"/api/users/{user['id']}")
        assert fetched.status_code == 200
        assert fetched.json() == user

        for i in range(5):
            client.post(
                "/api/users", json={"email": f"u{i}@example.com", "name": f"U {i}"}, headers=auth
            ).raise_for_status()
        page = client.get("/api/users", params={"limit": 4}).json()
        assert len(page["items"]) == 4
        rest = client.get("/api/users", params={"limit": 4, "after": page["next"]}).json()
        assert len(rest["items"]) == 2
        assert rest["next"] is None

        renamed = client.patch(f"/api/users/{user['id']}", json={"name": "Countess"}, headers=auth)
        assert renamed.status_code == 200
        assert renamed.json()["name"] == "Countess"

        deleted = client.delete(f"/api/users/{user['id']}", headers=auth)
        assert deleted.status_code == 204
        gone = client.delete(f"/api/users/{user['id']}", headers=auth)
        assert gone.status_code == 404


def test_web_calls_users_through_the_platform(shop: Shop) -> None:
    with httpx.Client(base_url=shop.url, timeout=10) as client:
        signup = client.post(
            "/api/signup",
            json={"email": "grace@example.com", "name": "Grace Hopper"},
            headers={"Idempotency-Key": "signup-1"},
        )
        assert signup.status_code == 201, signup.text
        user_id = signup.json()["user"]["id"]
        again = client.post("/api/signup", json={"email": "grace@example.com", "name": "G"})
        assert again.status_code == 409  # the users service's answer, passed on
        assert again.headers["content-type"] == "application/problem+json"
        assert again.json()["type"] == "about:blank"
        profile = client.get(f"/api/profile/{user_id}")
        assert profile.status_code == 200, profile.text
        assert profile.json()["greeting"] == "Hello, Grace!"
        missing = client.get("/api/profile/999999")
        assert missing.status_code == 404
        home = client.get("/api/home")
        assert [u["email"] for u in home.json()["newest"]] == ["grace@example.com"]
        # The demo token web hands out is one the gateway accepts on writes.
        token = client.post("/api/demo-token", params={"sub": "bob"}).text
        made = client.post(
            "/api/users",
            json={"email": "bob@example.com", "name": "Bob"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert made.status_code == 201, made.text
    # Both users instances took traffic: the gateway's and web's balancing.
    users = [i for i in shop.instances if i.name == "users"]
    with httpx.Client(base_url=shop.url, timeout=10) as client:
        for _ in range(20):
            client.get(f"/api/users/{user_id}").raise_for_status()
    assert all(i.served() > 0 for i in users), [i.served() for i in users]


class Load:
    """GETs through the gateway in a thread until stopped; counts what failed."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                try:
                    res = client.get(self.url)
                except httpx.HTTPError as exc:
                    self.failed.append(repr(exc))
                    continue
                if res.status_code == 200:
                    self.ok += 1
                else:
                    self.failed.append(f"{res.status_code} {res.text[:200]}")

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def test_instances_join_and_leave_under_load(shop: Shop) -> None:
    auth = {"Authorization": f"Bearer {demo_token(shop.config)}"}
    created = httpx.post(
        f"{shop.url}/api/users",
        json={"email": "load@example.com", "name": "Load"},
        headers=auth,
        timeout=10,
    )
    created.raise_for_status()
    url = f"{shop.url}/api/users/{created.json()['id']}"
    first, second = (i for i in shop.instances if i.name == "users")
    with Load(url) as load:
        time.sleep(0.5)
        # A new instance takes traffic within a second of registering.
        third = shop.start("users")
        shop.wait_registered("users", {first.address, second.address, third.address})
        registered = time.monotonic()
        while third.served() == 0:
            assert time.monotonic() - registered < 1.0, "the new instance got no traffic in 1 s"
            time.sleep(0.02)
        joined_after = time.monotonic() - registered
        # SIGTERM: the instance deregisters, is drained, then exits; nothing fails.
        shop.stop(first)
        assert first.proc.returncode == 0, tail(first.log)
        shop.wait_registered("users", {second.address, third.address}, timeout=1)
        time.sleep(0.5)
    assert load.failed == [], load.failed[:5]
    assert load.ok > 50
    print(f"new instance served within {joined_after * 1000:.0f} ms of registering")
