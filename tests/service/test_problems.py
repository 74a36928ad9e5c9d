"""Every error of a service is an RFC 9457 problem (application/problem+json), and its
OpenAPI document says so."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import HTTPException
from fastapi import Path as PathParam
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from meshgate.service import Service
from meshgate.service.problems import PROBLEMS, ProblemError, problem_responses
from meshgate.service.testing import capture_logs, in_process

DOCS = Path(__file__).resolve().parents[2] / "docs" / "services.md"
MEMBERS = {"type", "title", "status", "detail", "instance", "error", "request_id"}


class Order(BaseModel):
    item: str
    quantity: Annotated[int, Field(ge=1)]


def make_service() -> Service:
    service = Service("orders")
    app = service.app

    @app.get("/orders/{order_id}", responses=problem_responses(404))
    async def get_order(order_id: Annotated[int, PathParam(ge=1, le=1000)]) -> dict[str, int]:
        if order_id == 404:
            raise HTTPException(404, f"no order has id {order_id}")
        return {"id": order_id}

    @app.post("/orders", status_code=201, responses=problem_responses(409))
    async def create(order: Order) -> dict[str, Any]:
        if order.item == "taken":
            raise ProblemError(
                409, "an order for 'taken' exists", code="order_exists", item=order.item
            )
        return order.model_dump()

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret-connection-string=hunter2")

    @app.get("/odd")
    async def odd() -> None:
        raise HTTPException(418, {"detail": "short and stout", "spout": True})

    @app.delete("/orders/{order_id}", status_code=204)
    async def delete(order_id: int) -> None:
        raise HTTPException(410)

    return service


def assert_problem(response: httpx.Response, status: int, error: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert set(body) >= MEMBERS, body
    assert body["status"] == status
    assert body["error"] == error
    assert body["request_id"] == response.headers["x-request-id"]
    return body


async def test_an_unhandled_error_is_a_problem_and_one_logged_traceback() -> None:
    service = make_service()
    with capture_logs() as records:
        async with in_process(service) as client:
            response = await client.get("/boom", headers={"X-Request-ID": "req-boom"})
    body = assert_problem(response, 500, "internal_error")
    assert body["type"] == "https://meshgate.dev/problems/internal_error"
    assert body["instance"] == "/boom"
    assert "req-boom" in body["detail"]
    assert "hunter2" not in response.text  # the error's text stays in the log
    logged = [r for r in records if "exception" in r]
    assert len(logged) == 1, logged
    assert logged[0]["request_id"] == "req-boom"
    assert logged[0]["level"] == "error"
    assert "RuntimeError: secret-connection-string=hunter2" in logged[0]["exception"]
    assert "Traceback" in logged[0]["exception"]


async def test_an_error_in_a_middleware_added_later_is_a_problem_too() -> None:
    service = make_service()

    class Broken:
        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope.get("path") == "/orders/1":
                raise ValueError("a broken middleware")
            await self.app(scope, receive, send)

    service.app.add_middleware(Broken)
    with capture_logs("meshgate.service") as records:
        async with in_process(service) as client:
            response = await client.get("/orders/1")
    assert_problem(response, 500, "internal_error")
    assert [r["request_id"] for r in records if "exception" in r] == [
        response.headers["x-request-id"]
    ]


async def test_http_exceptions_and_framework_errors_are_problems() -> None:
    service = make_service()
    async with in_process(service) as client:
        missing = await client.get("/orders/404")
        unknown = await client.get("/nowhere", params={"token": "secret"})
        wrong_method = await client.put("/orders/1")
        conflict = await client.post("/orders", json={"item": "taken", "quantity": 1})
        teapot = await client.get("/odd")
        gone = await client.delete("/orders/1")

    body = assert_problem(missing, 404, "not_found")
    assert body["type"] == "about:blank"
    assert body["title"] == "Not Found"
    assert body["detail"] == "no order has id 404"
    assert body["instance"] == "/orders/404"

    body = assert_problem(unknown, 404, "no_route")
    assert body["type"] == "https://meshgate.dev/problems/no_route"
    assert body["detail"] == "no route matches GET /nowhere"
    assert "secret" not in unknown.text  # the query is not echoed

    body = assert_problem(wrong_method, 405, "method_not_allowed")
    assert body["detail"] == "PUT is not allowed on /orders/1; allowed: DELETE, GET"
    assert wrong_method.headers["allow"] == "DELETE, GET"

    body = assert_problem(conflict, 409, "order_exists")
    assert body["type"] == "about:blank"
    assert body["title"] == "Conflict"
    assert body["item"] == "taken"

    body = assert_problem(teapot, 418, "i_m_a_teapot")
    assert body["detail"] == "short and stout"
    assert body["spout"] is True

    assert_problem(gone, 410, "gone")


@pytest.mark.parametrize(
    ("call", "errors"),
    [
        (lambda c: c.get("/orders/0"), [["path", "order_id"]]),
        (lambda c: c.get("/orders/105828820558784692224"), [["path", "order_id"]]),
        (lambda c: c.get("/orders/x"), [["path", "order_id"]]),
        (
            lambda c: c.post("/orders", json={"quantity": 0}),
            [["body", "item"], ["body", "quantity"]],
        ),
        (lambda c: c.post("/orders", content=b"{not json"), [["body"]]),
    ],
)
async def test_validation_errors_are_problems_listing_every_field(
    call: Callable[[httpx.AsyncClient], Awaitable[httpx.Response]], errors: list[list[Any]]
) -> None:
    async with in_process(make_service()) as client:
        response = await call(client)
    body = assert_problem(response, 422, "validation_failed")
    assert body["type"] == "https://meshgate.dev/problems/validation_failed"
    assert [e["loc"] for e in body["errors"]] == errors
    assert all(set(e) == {"loc", "msg", "type"} for e in body["errors"])
    assert body["detail"].startswith(f"{len(errors)} ")
    assert ".".join(str(p) for p in errors[0]) in body["detail"]


async def test_the_openapi_document_names_the_problems() -> None:
    async with in_process(make_service()) as client:
        document = (await client.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    assert {"Problem", "ValidationProblem", "FieldError"} <= set(schemas)
    assert "HTTPValidationError" not in schemas
    assert set(schemas["Problem"]["required"]) >= {"type", "title", "status", "detail", "error"}
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    validation = {
        "application/problem+json": {"schema": {"$ref": "#/components/schemas/ValidationProblem"}}
    }
    operations = [op for item in document["paths"].values() for op in item.values()]
    assert len(operations) == 5
    for operation in operations:
        responses = operation["responses"]
        for status in ("500", "503", "504"):
            assert responses[status]["content"] == problem, (operation["operationId"], status)
        if "422" in responses:
            assert responses["422"]["content"] == validation
    get_order = document["paths"]["/orders/{order_id}"]["get"]["responses"]
    assert get_order["404"]["content"] == problem
    assert "422" in get_order
    assert document["paths"]["/orders"]["post"]["responses"]["409"]["content"] == problem
    assert "application/json" in get_order["200"]["content"]  # success stays JSON


def test_the_catalogue_and_the_docs_agree() -> None:
    text = DOCS.read_text()
    section = text[text.index("### Errors") :]
    section = section[: section.index("\n## ")]
    documented = dict(re.findall(r"^\| `(\w+)` \| (\d{3}) \|", section, re.MULTILINE))
    assert documented == {code: str(kind.status) for code, kind in PROBLEMS.items()}
