"""CORS at the gateway: preflights are answered here and never reach the upstream."""

from __future__ import annotations

from meshgate.config.model import CorsSettings
from meshgate.gateway.contract import FilterExchange, Verdict, reply
from meshgate.gateway.http import status_line

__all__ = ["CorsFilter"]


def _header(exchange: FilterExchange, name: bytes) -> bytes | None:
    for key, value in exchange.headers:
        if key.lower() == name:
            return value
    return None


class CorsFilter:
    """Answers preflights (OPTIONS with Access-Control-Request-Method) and adds the
    CORS response headers to actual requests from allowed origins. Requests from
    other origins pass unchanged: the browser, seeing no CORS headers, blocks them."""

    name = "cors"

    def __init__(self, settings: CorsSettings) -> None:
        self._any = "*" in settings.allow_origins
        self._origins = frozenset(o.encode() for o in settings.allow_origins)
        self._methods = frozenset(m.upper().encode() for m in settings.allow_methods)
        self._any_header = "*" in settings.allow_headers
        self._headers = frozenset(h.lower().encode() for h in settings.allow_headers)
        credentials = b"Access-Control-Allow-Credentials: true\r\n"
        self._credentials = credentials if settings.allow_credentials else b""
        expose = ", ".join(settings.expose_headers).encode()
        self._expose = b"Access-Control-Expose-Headers: " + expose + b"\r\n" if expose else b""
        self._preflight_tail = (
            b"Access-Control-Allow-Methods: "
            + ", ".join(settings.allow_methods).encode()
            + b"\r\nAccess-Control-Max-Age: "
            + str(int(settings.max_age)).encode()
            + b"\r\n"
            + self._credentials
        )

    def _allowed(self, origin: bytes) -> bool:
        return self._any or origin in self._origins

    def _origin_lines(self, origin: bytes) -> bytes:
        # With credentials the origin must be echoed, never "*".
        value = b"*" if self._any and not self._credentials else origin
        return b"Access-Control-Allow-Origin: " + value + b"\r\nVary: Origin\r\n"

    def request(self, exchange: FilterExchange) -> Verdict:
        origin = _header(exchange, b"origin")
        if origin is None:
            # The answer depends on Origin, so caches must key on it even here.
            exchange.resp_extra += b"Vary: Origin\r\n"
            return None
        requested = _header(exchange, b"access-control-request-method")
        if exchange.method == b"OPTIONS" and requested is not None:
            return self._preflight(exchange, origin, requested)
        if self._allowed(origin):
            exchange.resp_extra += self._origin_lines(origin) + self._credentials + self._expose
        else:
            exchange.resp_extra += b"Vary: Origin\r\n"
        return None

    def response(self, exchange: FilterExchange, headers: bytes) -> bytes:
        """The gateway answers CORS for this route: the upstream's own
        Access-Control-* lines go (a second Allow-Origin makes browsers refuse the
        response); the gateway's, from :attr:`FilterExchange.resp_extra`, stay."""
        if b"ccess-control-" not in headers.lower():
            return headers
        own = [
            line + b"\r\n"
            for line in exchange.resp_extra.split(b"\r\n")
            if line[:15].lower() == b"access-control-"
        ]
        kept = [
            line + b"\r\n"
            for line in headers.split(b"\r\n")[:-1]
            if line[:15].lower() != b"access-control-"
        ]
        return b"".join(kept + own)

    def _preflight(self, exchange: FilterExchange, origin: bytes, method: bytes) -> bytes:
        if not self._allowed(origin):
            return reply(exchange, 403, "cors_origin", f"origin {origin.decode()!r} not allowed")
        if method.upper() not in self._methods:
            return reply(exchange, 403, "cors_method", f"method {method.decode()!r} not allowed")
        wanted = _header(exchange, b"access-control-request-headers") or b""
        names = [h.strip() for h in wanted.split(b",") if h.strip()]
        if not self._any_header:
            for name in names:
                if name.lower() not in self._headers:
                    return reply(
                        exchange, 403, "cors_header", f"header {name.decode()!r} not allowed"
                    )
        allow_headers = b", ".join(names) if names else b""
        exchange.status = 204
        head = [
            status_line(204),
            self._origin_lines(origin),
            self._preflight_tail,
        ]
        if allow_headers:
            head.append(b"Access-Control-Allow-Headers: " + allow_headers + b"\r\n")
        head.append(exchange.rt.rid_prefix + exchange.request_id + b"\r\n")
        if not exchange.keep_alive:
            head.append(b"Connection: close\r\n")
        head.append(b"Content-Length: 0\r\n\r\n")
        return b"".join(head)
