"""Who may use the admin listener: the bearer token, or a dashboard session.

The dashboard's login page exchanges the admin token for a session: a random id in
an ``HttpOnly``, ``SameSite=Strict`` cookie (``Secure`` over HTTPS), kept in memory
by the control plane for :attr:`AdminAuth.session_ttl` seconds. The token itself
never reaches a URL, the page's scripts or the browser's storage.

Cross-site request forgery: a browser sends a ``SameSite=Strict`` cookie only with
requests from the admin listener's own pages, and a request that changes something
(any method but GET, HEAD and OPTIONS) authenticated by the cookie must also come
from the same origin (``Origin``, else ``Sec-Fetch-Site``), or it is refused with
403. A request with the bearer header needs neither: a browser never adds it by itself.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable

from fastapi import HTTPException, Request

__all__ = ["SESSION_COOKIE", "AdminAuth", "bearer", "same_origin"]

SESSION_COOKIE = "meshgate_session"
"""The dashboard session cookie's name."""
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def bearer(request: Request) -> bytes:
    """The bearer token of the request's ``Authorization`` header, or ``b""``."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return given.strip().encode() if scheme.lower() == "bearer" else b""


def same_origin(request: Request) -> bool:
    """Whether a browser says the request comes from a page of this same origin."""
    origin = request.headers.get("origin")
    if origin is not None:
        host = request.headers.get("host", "")
        return origin in (f"{request.url.scheme}://{host}",)
    return request.headers.get("sec-fetch-site") == "same-origin"


class AdminAuth:
    """The admin listener's check, usable as a FastAPI dependency: a request passes
    with ``Authorization: Bearer <token>`` (the admin token, or one of
    ``also_tokens``), or with a live dashboard session (see the module docstring).

    Raises ``HTTPException`` 401 without credentials, 403 for a cross-origin change
    made with a session cookie.
    """

    def __init__(
        self,
        token: str,
        *,
        realm: str = "meshgate-admin",
        detail: str | None = None,
        session_ttl: float = 12 * 3600.0,
        max_sessions: int = 256,
    ) -> None:
        self._token = token.encode()
        self.realm = realm
        self.detail = detail or (
            "missing or wrong admin token; send 'Authorization: Bearer <token>' with the "
            "token from the admin token file, or log in to the dashboard at /ui"
        )
        self.session_ttl = session_ttl
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, float] = OrderedDict()

    # -- tokens and sessions

    def token_ok(self, given: bytes, also: Iterable[bytes] = ()) -> bool:
        """Whether ``given`` is the admin token (or one of ``also``), in constant time."""
        ok = hmac.compare_digest(given, self._token)
        for other in also:
            # Every comparison runs: the time taken tells nothing.
            ok = hmac.compare_digest(given, other) | ok
        return bool(given) and ok

    def login(self, given: str) -> str | None:
        """A new session id when ``given`` is the admin token, else None."""
        if not self.token_ok(given.strip().encode()):
            return None
        now = time.monotonic()
        self._expire(now)
        session = secrets.token_urlsafe(32)
        self._sessions[session] = now + self.session_ttl
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return session

    def logout(self, request: Request) -> None:
        """End the request's session, if it has one."""
        session = request.cookies.get(SESSION_COOKIE)
        if session:
            self._sessions.pop(session, None)

    def _expire(self, now: float) -> None:
        while self._sessions:
            session, until = next(iter(self._sessions.items()))
            if until > now:
                break
            del self._sessions[session]

    def has_session(self, request: Request) -> bool:
        """Whether the request carries a live session cookie."""
        session = request.cookies.get(SESSION_COOKIE)
        if not session:
            return False
        until = self._sessions.get(session)
        if until is None:
            return False
        if until <= time.monotonic():
            del self._sessions[session]
            return False
        return True

    def session_allows(self, request: Request) -> bool:
        """Whether the request's session lets it through (False without a session).

        Raises:
            HTTPException: 403 for a change (not GET/HEAD/OPTIONS) from another origin.
        """
        if not self.has_session(request):
            return False
        if request.method not in _SAFE_METHODS and not same_origin(request):
            raise HTTPException(
                status_code=403,
                detail="a change made with the dashboard's session must come from its own "
                "pages (same origin); scripts send 'Authorization: Bearer <token>' instead",
            )
        return True

    def refuse(self) -> HTTPException:
        return HTTPException(
            status_code=401,
            detail=self.detail,
            headers={"WWW-Authenticate": f'Bearer realm="{self.realm}"'},
        )

    def __call__(self, request: Request) -> None:
        """The dependency: the bearer token, else a session; 401 otherwise."""
        given = bearer(request)
        if given and self.token_ok(given):
            return
        if self.session_allows(request):
            return
        raise self.refuse()
