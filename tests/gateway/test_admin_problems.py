"""Every error of the control plane's FastAPI apps is an RFC 9457 problem (issue 11):
unknown paths, wrong methods, invalid parameters, and anything unhandled, whose
traceback is logged and whose text never reaches the client."""

from __future__ import annotations

import logging

import httpx
import pytest
from fastapi import FastAPI, Query

from meshgate.gateway.admin import install_problems

pytestmark = pytest.mark.asyncio


def app_with_problems() -> FastAPI:
    app = FastAPI()
    install_problems(app)

    @app.get("/status")
    async def status(limit: int = Query(default=1, ge=1, le=10)) -> dict[str, int]:
        return {"limit": limit}

    @app.get("/broken")
    async def broken() -> None:
        raise RuntimeError("secret-password-in-the-message")

    return app


async def call(method: str, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app_with_problems(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
        return await client.request(method, path)


@pytest.mark.parametrize(
    ("method", "path", "status", "code", "says"),
    [
        ("GET", "/nope", 404, "not_found", "no admin endpoint GET /nope"),
        ("DELETE", "/status", 405, "method_not_allowed", "Method Not Allowed"),
        ("GET", "/status?limit=99", 422, "validation_failed", "query.limit"),
        ("GET", "/status?limit=x", 422, "validation_failed", "query.limit"),
    ],
)
async def test_errors_are_problems(
    method: str, path: str, status: int, code: str, says: str
) -> None:
    response = await call(method, path)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == f"https://meshgate.dev/problems/{code}"
    assert (body["status"], body["error"]) == (status, code)
    assert body["instance"] == path.partition("?")[0]
    assert says in body["detail"]
    assert body["title"]


async def test_an_unhandled_error_is_a_500_problem_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="meshgate.admin"):
        response = await call("GET", "/broken")
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["error"] == "internal_error"
    assert "secret-password" not in response.text
    logged = [r for r in caplog.records if r.name == "meshgate.admin"]
    assert logged
    assert logged[0].exc_info is not None
