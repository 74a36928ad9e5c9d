"""The dashboard: a web page at ``/ui`` on the admin listener.

Every asset ships in this package (``static/``): no CDN, no build step, vanilla
JavaScript drawing SVG. The page reads the admin listener's own APIs with the
session cookie its login page sets (see :mod:`meshgate.observability.auth`):
``/v1/observability`` for traces, logs, RED and the map, ``/status``,
``/upstreams``, ``/config`` and ``/metrics`` for the gateway, ``/v1/registry`` for
instances.

Pages are plug-ins of one contract: a script that calls
``MeshgateUI.registerPage({name, title, render})``. The built-in pages use it, and
:class:`DashboardPage` adds one from elsewhere (the sagas and dead letters pages of
the events work), served at ``/ui/pages/<name>.js`` and listed at
``/ui/pages.json`` for the page to load.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from meshgate.errors import PROBLEM_MEDIA_TYPE, problem_document
from meshgate.observability.auth import SESSION_COOKIE, AdminAuth, same_origin

__all__ = ["PREFIX", "DashboardPage", "create_dashboard_router"]

PREFIX = "/ui"
"""Where the dashboard is served on the admin listener."""
_STATIC = Path(str(resources.files("meshgate.observability") / "static"))
_ASSET_RE = re.compile(r"[a-z0-9][a-z0-9_.-]*\.(?:js|css|svg|html)")
_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,40}")
_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".html": "text/html; charset=utf-8",
}
_MAX_FORM = 4096
_HEADERS = {
    # Every script and style is a file of ours: nothing inline, nothing from elsewhere,
    # so a span attribute that holds markup can never run.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # "no-referrer" makes Chromium send Origin: null
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class DashboardPage:
    """A page added to the dashboard: its script registers it with
    ``MeshgateUI.registerPage({name, title, render(root, ui)})``."""

    name: str
    """Its name in the page's address (``#/sagas``): lowercase letters, digits, '-'."""
    title: str
    """Its entry in the navigation."""
    script: Path
    """The JavaScript file that registers it."""

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise ValueError(
                f"DashboardPage name {self.name!r}: use lowercase letters, digits and '-', "
                "starting with a letter"
            )


def _page(name: str, status: int = 200, error: str = "") -> HTMLResponse:
    text = (_STATIC / name).read_text(encoding="utf-8")
    text = text.replace("{{error}}", html.escape(error))
    return HTMLResponse(text, status_code=status, headers=_HEADERS)


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def create_dashboard_router(auth: AdminAuth, *, pages: Sequence[DashboardPage] = ()) -> APIRouter:
    """The dashboard's pages under ``/ui``, behind ``auth`` (a login page otherwise).

    Raises:
        ValueError: two pages share a name.
    """
    extra = {p.name: p for p in pages}
    if len(extra) != len(pages):
        raise ValueError("two dashboard pages share a name; give each its own")
    router = APIRouter(prefix=PREFIX, include_in_schema=False)

    @router.get("")
    async def root() -> Response:
        return RedirectResponse(f"{PREFIX}/", status_code=307)

    @router.get("/")
    async def index(request: Request) -> Response:
        if not auth.has_session(request):
            return RedirectResponse(f"{PREFIX}/login", status_code=303)
        return _page("index.html")

    @router.get("/login")
    async def login_page(request: Request) -> Response:
        if auth.has_session(request):
            return RedirectResponse(f"{PREFIX}/", status_code=303)
        return _page("login.html")

    @router.post("/login")
    async def login(request: Request) -> Response:
        if request.headers.get("origin") is not None and not same_origin(request):
            return _page("login.html", 403, "log in from the dashboard's own page")
        body = await request.body()
        if len(body) > _MAX_FORM:
            return _page("login.html", 413, "the form is too large")
        fields = parse_qs(body.decode("utf-8", "replace"))
        session = auth.login(fields.get("token", [""])[0])
        if session is None:
            return _page(
                "login.html",
                401,
                "wrong token: paste the admin token (meshgate ps names its file)",
            )
        response = RedirectResponse(f"{PREFIX}/", status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            session,
            max_age=int(auth.session_ttl),
            path="/",
            secure=_secure(request),
            httponly=True,
            samesite="strict",
        )
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        if not same_origin(request):
            return JSONResponse(
                problem_document(403, "forbidden", "log out from the dashboard's own page"),
                403,
                media_type=PROBLEM_MEDIA_TYPE,
            )
        auth.logout(request)
        response = RedirectResponse(f"{PREFIX}/login", status_code=303)
        response.delete_cookie(
            SESSION_COOKIE, path="/", secure=_secure(request), httponly=True, samesite="strict"
        )
        return response

    @router.get("/pages.json")
    async def page_list(request: Request) -> Response:
        if not auth.has_session(request):
            raise auth.refuse()
        return JSONResponse(
            [
                {"name": p.name, "title": p.title, "script": f"{PREFIX}/pages/{p.name}.js"}
                for p in extra.values()
            ],
            headers=_HEADERS,
        )

    @router.get("/pages/{name}.js")
    async def page_script(name: str, request: Request) -> Response:
        page = extra.get(name)
        if page is None or not auth.has_session(request):
            return Response(status_code=404)
        return FileResponse(page.script, media_type=_TYPES[".js"], headers=_HEADERS)

    @router.get("/static/{asset}")
    async def static(asset: str) -> Response:
        # Public: the assets hold no data, and the login page needs its stylesheet.
        path = _STATIC / asset
        if not _ASSET_RE.fullmatch(asset) or not path.is_file():
            return Response(status_code=404)
        return FileResponse(
            path,
            media_type=_TYPES[path.suffix],
            headers={**_HEADERS, "Cache-Control": "no-cache"},
        )

    return router
