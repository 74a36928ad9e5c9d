"""Property-based: requests drawn from the shop's own OpenAPI documents, sent to real
users and web services on loopback, never get a server error, always get a status
the document lists, and get every error as an RFC 9457 problem.

This is the class of bug a fuzzer found (an integer past 64 bits in a path gave a
plain-text 500). Deterministic (derandomized, no example database) and bounded: a
fixed number of examples per operation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvloop
from examples.shop.users.app import MIGRATIONS, create_service
from hypothesis import HealthCheck, given, settings

from meshgate.data.migrations import upgrade
from meshgate.events import migrations as event_migrations
from meshgate.service.testing import serving, use_endpoints
from tests.openapi_strategies import Call, Operation, calls, check_answer, operations

pytestmark = pytest.mark.timeout(120)

EXAMPLES = 60


@dataclass
class Shop:
    users: str
    web: str
    documents: dict[str, dict[str, Any]]


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    """users (SQLite, migrated) and web calling it, served by their own event loop in a
    thread, so that the sync Hypothesis tests can call them over real sockets.

    web is the module-level service of examples.shop.web.app (its client to users
    is pointed at this users instance and closed when the fixture ends)."""
    database = tmp_path_factory.mktemp("fuzz") / "users.db"
    url = f"sqlite:///{database}"
    upgrade(url, MIGRATIONS)
    event_migrations.upgrade(url)  # users announces new users through its outbox
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SHOP_DEMO_TOKEN_SECRET", "fuzz-demo-secret-0123456789abcdef0123")
        env.delenv("MESHGATE_REGISTRY_URL", raising=False)
        from examples.shop.web.app import service as web

        users = create_service(url, "memory://", cache_ttl=1)
        loop = uvloop.new_event_loop()
        ready: concurrent.futures.Future[tuple[str, str]] = concurrent.futures.Future()
        stop = asyncio.Event()

        async def run() -> None:
            async with serving(users) as users_address:
                use_endpoints(web, "users", [users_address])
                async with serving(web) as web_address:
                    ready.set_result((users_address, web_address))
                    await stop.wait()

        def main() -> None:
            try:
                loop.run_until_complete(run())
            except BaseException as exc:
                if not ready.done():
                    ready.set_exception(exc)
                raise
            finally:
                loop.close()

        thread = threading.Thread(target=main, name="shop-fuzz", daemon=True)
        thread.start()
        try:
            users_address, web_address = ready.result(timeout=30)
            documents = {
                name: httpx.get(f"http://{address}/openapi.json", timeout=10).json()
                for name, address in (("users", users_address), ("web", web_address))
            }
            yield Shop(f"http://{users_address}", f"http://{web_address}", documents)
        finally:
            loop.call_soon_threadsafe(stop.set)
            thread.join(30)


def _operations(service: str) -> list[Operation]:
    """The operations of ``service``'s document, read from the app (no server needed
    to collect the tests)."""
    if service == "users":
        document = create_service("sqlite://", "memory://").app.openapi()
    else:
        from examples.shop.web.app import app

        document = app.openapi()
    return operations(document)


CASES = [
    pytest.param(service, operation, id=f"{service}: {operation.id}")
    for service in ("users", "web")
    for operation in _operations(service)
]


def test_every_operation_is_fuzzed() -> None:
    assert {c.id for c in CASES} >= {
        "users: POST /users",
        "users: GET /users/{user_id}",
        "users: GET /users",
        "users: PATCH /users/{user_id}",
        "users: DELETE /users/{user_id}",
        "web: GET /api/profile/{user_id}",
        "web: POST /api/signup",
    }


@pytest.mark.parametrize(("service", "operation"), CASES)
def test_answers_follow_the_openapi_document(
    shop: Shop, service: str, operation: Operation
) -> None:
    document = shop.documents[service]
    base = shop.users if service == "users" else shop.web
    live = next(o for o in operations(document) if o.id == operation.id)
    with httpx.Client(base_url=base, timeout=10) as client:

        @settings(
            max_examples=EXAMPLES,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        @given(call=calls(document, live))
        def property_(call: Call) -> None:
            check_answer(live, call, call.send(client))

        property_()


def test_the_checks_catch_what_they_are_for() -> None:
    """The checks fail on the bugs of issue 11: a plain-text 500, an answer the
    document does not list, an error that is not a problem."""
    document = {"paths": {"/x": {"get": {"responses": {"200": {}, "422": {}}}}}}
    (operation,) = operations(document)
    request = httpx.Request("GET", "http://shop/x")
    sent = Call("GET", "/x", [], None, {})
    plain = httpx.Response(
        500, text="Internal Server Error", headers={"content-type": "text/plain"}, request=request
    )
    with pytest.raises(AssertionError, match="-> 500"):
        check_answer(operation, sent, plain)
    undocumented = httpx.Response(404, json={"detail": "Not Found"}, request=request)
    with pytest.raises(AssertionError, match="not in the OpenAPI document"):
        check_answer(operation, sent, undocumented)
    not_a_problem = httpx.Response(422, json={"detail": []}, request=request)
    with pytest.raises(AssertionError):
        check_answer(operation, sent, not_a_problem)
