"""The dashboard's login, session cookie, CSRF rule and assets, over real HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI

from meshgate.observability import TelemetryStore
from meshgate.observability.auth import SESSION_COOKIE, AdminAuth
from meshgate.observability.dashboard import DashboardPage
from meshgate.observability.mount import create_admin_router
from tests.observability.conftest import AUTH, TOKEN
from tests.registry.conftest import Server


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[Server]:
    """The observability routes as the admin app mounts them, plus one admin change
    endpoint (as /reload is) behind the same check."""
    auth = AdminAuth(TOKEN, session_ttl=3600)
    script = tmp_path / "sagas.js"
    script.write_text("MeshgateUI.registerPage({name: 'sagas', title: 'Sagas', render() {}});\n")
    app = FastAPI()
    changes = APIRouter(dependencies=[Depends(auth)])

    @changes.post("/reload")
    async def reload() -> dict[str, bool]:
        return {"ok": True}

    app.include_router(changes)
    app.include_router(
        create_admin_router(
            TelemetryStore(), auth, exporters=auth, pages=[DashboardPage("sagas", "Sagas", script)]
        )
    )
    server = await Server(app).start()
    try:
        yield server
    finally:
        await server.stop()


async def login(http: httpx.AsyncClient, token: str = TOKEN) -> httpx.Response:
    return await http.post(
        "/ui/login",
        content=f"token={token}",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )


async def test_the_login_page_exchanges_the_token_for_a_strict_http_only_cookie(
    admin: Server,
) -> None:
    async with httpx.AsyncClient(base_url=admin.url) as http:
        first = await http.get("/ui/")
        assert (first.status_code, first.headers["location"]) == (303, "/ui/login")
        page = await http.get("/ui/login")
        assert page.status_code == 200
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY"
        assert 'name="token"' in page.text
        assert "{{error}}" not in page.text
        wrong = await login(http, "not-the-token")
        assert wrong.status_code == 401
        assert "wrong token" in wrong.text
        assert SESSION_COOKIE not in wrong.cookies
        ok = await login(http)
        assert (ok.status_code, ok.headers["location"]) == (303, "/ui/")
        cookie = ok.headers["set-cookie"]
        assert cookie.startswith(f"{SESSION_COOKIE}=")
        attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
        assert {"httponly", "samesite", "path", "max-age"} <= attributes
        assert "samesite=strict" in cookie.lower()
        assert "secure" not in attributes  # plain HTTP here; set over HTTPS
        assert TOKEN not in cookie
        index = await http.get("/ui/")
        assert index.status_code == 200
        assert "/ui/static/app.js" in index.text
        assert (await http.get("/v1/observability/stats")).status_code == 200
        assert (await http.get("/ui/login")).status_code == 303


async def test_a_change_made_with_the_cookie_must_come_from_the_same_origin(
    admin: Server,
) -> None:
    async with httpx.AsyncClient(base_url=admin.url) as http:
        await login(http)
        assert (await http.post("/reload")).status_code == 403
        evil = await http.post("/reload", headers={"Origin": "http://evil.example"})
        assert evil.status_code == 403
        assert "same origin" in evil.json()["detail"]
        same = await http.post("/reload", headers={"Origin": admin.url})
        assert same.status_code == 200
        fetch = await http.post("/reload", headers={"Sec-Fetch-Site": "same-origin"})
        assert fetch.status_code == 200
    async with httpx.AsyncClient(base_url=admin.url) as scripted:
        # The bearer header needs no origin: browsers never add it by themselves.
        assert (await scripted.post("/reload", headers=AUTH)).status_code == 200
        assert (await scripted.post("/reload")).status_code == 401


async def test_logging_in_from_another_site_is_refused(admin: Server) -> None:
    async with httpx.AsyncClient(base_url=admin.url) as http:
        res = await http.post(
            "/ui/login",
            content=f"token={TOKEN}",
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Origin": "http://evil.example",
            },
        )
        assert res.status_code == 403
        assert SESSION_COOKIE not in res.cookies


async def test_logging_out_ends_the_session(admin: Server) -> None:
    async with httpx.AsyncClient(base_url=admin.url) as http:
        await login(http)
        session = http.cookies[SESSION_COOKIE]
        assert (
            await http.post("/ui/logout", headers={"Origin": "http://x.example"})
        ).status_code == 403
        out = await http.post("/ui/logout", headers={"Origin": admin.url})
        assert (out.status_code, out.headers["location"]) == (303, "/ui/login")
    async with httpx.AsyncClient(base_url=admin.url, cookies={SESSION_COOKIE: session}) as old:
        assert (await old.get("/v1/observability/stats")).status_code == 401
        assert (await old.get("/ui/")).status_code == 303


async def test_assets_ship_in_the_package_and_nothing_else_is_served(admin: Server) -> None:
    async with httpx.AsyncClient(base_url=admin.url) as http:
        for asset, kind in [
            ("app.js", "text/javascript"),
            ("pages.js", "text/javascript"),
            ("app.css", "text/css"),
            ("logo.svg", "image/svg+xml"),
        ]:
            res = await http.get(f"/ui/static/{asset}")
            assert res.status_code == 200, asset
            assert res.headers["content-type"].startswith(kind)
        for bad in ["../auth.py", "..%2fauth.py", "nothing.js", "auth.py", ".hidden.js"]:
            assert (await http.get(f"/ui/static/{bad}")).status_code == 404, bad
        text = (await http.get("/ui/static/app.js")).text + (
            await http.get("/ui/static/pages.js")
        ).text
        # No markup from data, nothing from elsewhere.
        assert "innerHTML" not in text
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text


async def test_added_pages_are_listed_and_served_to_a_session_only(admin: Server) -> None:
    async with httpx.AsyncClient(base_url=admin.url) as http:
        assert (await http.get("/ui/pages.json")).status_code == 401
        assert (await http.get("/ui/pages/sagas.js")).status_code == 404
        await login(http)
        assert (await http.get("/ui/pages.json")).json() == [
            {"name": "sagas", "title": "Sagas", "script": "/ui/pages/sagas.js"}
        ]
        script = await http.get("/ui/pages/sagas.js")
        assert script.status_code == 200
        assert "registerPage" in script.text
        assert (await http.get("/ui/pages/other.js")).status_code == 404


@pytest.mark.parametrize("name", ["Sagas", "1st", "", "a/b"])
def test_a_page_name_must_fit_the_address(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="use lowercase letters, digits and '-'"):
        DashboardPage(name, "x", tmp_path / "x.js")


def test_sessions_are_bounded_and_expire() -> None:
    auth = AdminAuth(TOKEN, session_ttl=0.0, max_sessions=2)
    assert auth.login("wrong") is None
    assert auth.login(f" {TOKEN}\n") is not None
    assert not auth.token_ok(b"")
    capped = AdminAuth(TOKEN, max_sessions=2)
    sessions = [capped.login(TOKEN) for _ in range(3)]
    assert len(set(sessions)) == 3
    assert len(capped._sessions) == 2
    assert sessions[0] not in capped._sessions
