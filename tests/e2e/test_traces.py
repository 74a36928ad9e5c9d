"""Traces end to end: the shop run by ``meshgate up`` from a plain install, exporting
to a real OTLP receiver named in its system file. One request through the gateway
is one trace, from the gateway's spans to the SQL query of users, every span linked
to its parent; and the log lines of that request carry its trace id."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.test_up import Up, finish, shop_file, start_up
from tests.otlp import Received, Receiver, receiver
from tests.venvs import Venv

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

EMAIL = "grace.traced@example.com"


@pytest.fixture(scope="module")
def collector() -> Iterator[Receiver]:
    with receiver() as found:
        yield found


@pytest.fixture(scope="module")
def traced_shop(
    tmp_path_factory: pytest.TempPathFactory, core_venv: Venv, collector: Receiver
) -> Iterator[Up]:
    folder = tmp_path_factory.mktemp("traced-shop")
    path = shop_file(folder)
    data = yaml.safe_load(path.read_text())
    data["observability"] = {"otlp": {"endpoint": collector.url}, "sampling": {"ratio": 1.0}}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    up = start_up(folder, venv=core_venv)
    try:
        up.wait_ready()
        yield up
    finally:
        finish(up)


def trace_of(spans: list[Received], trace_id: str) -> list[Received]:
    return [s for s in spans if s.trace_id == trace_id]


def one(spans: list[Received], service: str, kind: str, name: str | None = None) -> Received:
    found = [s for s in spans if s.service == service and s.kind == kind and name in (None, s.name)]
    assert len(found) == 1, (
        f"{service} {kind} {name}: {[(s.service, s.kind, s.name) for s in spans]}"
    )
    return found[0]


def is_select(span: Received) -> bool:
    return str(span.attributes.get("db.statement", "")).startswith("SELECT")


def ancestors(span: Received, spans: list[Received]) -> list[Received]:
    by_id = {s.span_id: s for s in spans}
    chain = []
    while span.parent_id and span.parent_id in by_id:
        span = by_id[span.parent_id]
        chain.append(span)
    return chain


def json_lines(folder: Path, instance: str) -> list[dict[str, object]]:
    """The JSON log lines an instance wrote (its file in the state folder)."""
    found = []
    for line in (folder / ".meshgate" / "logs" / f"{instance}.log").read_text().splitlines():
        _, _, written = line.partition(" ")
        if written.startswith("{"):
            found.append(json.loads(written))
    return found


def test_one_request_is_one_trace_from_the_gateway_to_the_query(
    traced_shop: Up, collector: Receiver
) -> None:
    url = traced_shop.gateway_url()
    with httpx.Client(base_url=url, timeout=10) as client:
        token = client.post("/api/demo-token").text
        made = client.post(
            "/api/users",
            json={"email": EMAIL, "name": "Grace Hopper"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert made.status_code == 201, made.text
        user_id = made.json()["id"]
        profile = client.get(f"/api/profile/{user_id}")
    assert profile.status_code == 200, profile.text
    request_id = profile.headers["x-request-id"]

    def request_span(spans: list[Received]) -> Received | None:
        """The gateway's server span of the request, found by its request id."""
        return next(
            (s for s in spans if s.attributes.get("meshgate.request_id") == request_id), None
        )

    def complete(spans: list[Received]) -> bool:
        found = request_span(spans)
        if found is None:
            return False
        mine = trace_of(spans, found.trace_id)
        return {"meshgate-gateway", "web", "users"} <= {s.service for s in mine} and any(
            is_select(s) for s in mine
        )

    received = collector.wait_for("the whole trace", complete, timeout=60)
    root = request_span(received)
    assert root is not None
    trace_id = root.trace_id
    spans = trace_of(received, trace_id)

    gateway_server = one(spans, "meshgate-gateway", "server")
    gateway_client = one(spans, "meshgate-gateway", "client")
    web_server = one(spans, "web", "server")
    web_client = one(spans, "web", "client", "GET users")
    users_server = one(spans, "users", "server")
    query = next(
        s
        for s in spans
        if s.service == "users" and str(s.attributes.get("db.statement", "")).startswith("SELECT")
    )

    # Each span names its parent: the whole path of the request, in one tree.
    assert gateway_server is root
    assert gateway_server.parent_id == ""
    assert gateway_client.parent_id == gateway_server.span_id
    assert web_server.parent_id == gateway_client.span_id
    assert web_server.name == "GET /api/profile/{user_id}"
    assert web_server.attributes["http.route"] == "/api/profile/{user_id}"
    assert web_client in ancestors(users_server, spans)
    assert users_server.parent_id == web_client.span_id
    assert users_server.name == "GET /users/{user_id}"
    assert users_server in ancestors(query, spans)
    assert web_server in ancestors(web_client, spans)

    # One client span for the call (the httpx instrumentation, on in meshgate serve,
    # makes none of its own for it), and none for the registry's heartbeats.
    assert [s for s in spans if s.service == "web" and s.kind == "client"] == [web_client]
    # The call's span: the instance that answered, retries and the breaker.
    assert web_client.attributes["peer.service"] == "users"
    assert web_client.attributes["meshgate.instance"] in traced_shop.registered("users")
    assert web_client.attributes["meshgate.retries"] == 0
    assert web_client.attributes["meshgate.breaker.state"] == "closed"
    assert web_client.attributes["http.response.status_code"] == 200

    # The statement as sent, with its placeholder: never the values.
    statement = str(query.attributes["db.statement"])
    assert "?" in statement
    assert str(user_id) not in statement.replace("users.id", "")
    assert EMAIL not in statement
    assert "Grace" not in statement
    for span in spans:
        assert EMAIL not in json.dumps(span.attributes)

    # Who each process is.
    assert web_server.resource["service.namespace"] == "shop"
    assert web_server.resource["service.instance.id"] == "web-1"
    assert users_server.resource["service.instance.id"] in {"users-1", "users-2"}

    # The log lines of the request carry its trace id, in each service.
    instance = str(users_server.resource["service.instance.id"])
    web_lines = [
        r for r in json_lines(traced_shop.folder, "web-1") if r.get("trace_id") == trace_id
    ]
    users_lines = [
        r for r in json_lines(traced_shop.folder, instance) if r.get("trace_id") == trace_id
    ]
    assert any(r["logger"] == "meshgate.access" for r in web_lines), web_lines
    assert any(r["logger"] == "meshgate.access" for r in users_lines), users_lines
    access = next(r for r in users_lines if r["logger"] == "meshgate.access")
    assert access["span_id"] == users_server.span_id
    assert access["request_id"] == request_id  # the gateway's id, carried by web's call
