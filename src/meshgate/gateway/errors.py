"""The gateway's errors: its exception types, and the one catalogue of the problems its
data plane answers with (RFC 9457 problem details).

Every response the gateway itself produces is ``application/problem+json``: ``type``
(``https://meshgate.dev/problems/<code>``, documented in docs/gateway.md#errors),
``title``, ``status``, ``detail``, ``instance`` (the request path, when there is one),
and the extension members ``error`` (the code), ``route``, ``upstream`` and
``request_id``.
"""

from __future__ import annotations

from typing import NamedTuple

from meshgate.errors import PROBLEM_TYPE, MeshgateError
from meshgate.routing.errors import PathError

__all__ = [
    "PROBLEMS",
    "PROBLEM_TYPE",
    "GatewayError",
    "PathError",
    "Problem",
    "RedisError",
    "problem_type",
]


class GatewayError(MeshgateError):
    """The root of the gateway's errors."""


class RedisError(GatewayError):
    """Redis answered with an error, or could not be reached (rate limits, shared
    health)."""


class Problem(NamedTuple):
    """One kind of error the data plane answers with."""

    status: int
    title: str


PROBLEMS: dict[str, Problem] = {
    "bad_request": Problem(400, "Malformed HTTP request"),
    "bad_host": Problem(400, "Invalid Host header"),
    "missing_host": Problem(400, "Missing Host header"),
    "bad_target": Problem(400, "Invalid request target"),
    "bad_path": Problem(400, "Invalid request path"),
    "bad_authorization": Problem(400, "More than one Authorization header"),
    "bad_api_key": Problem(400, "More than one API key"),
    "bad_upgrade": Problem(400, "Invalid upgrade request"),
    "bad_chunk": Problem(400, "Chunk extensions or trailers too large"),
    "unauthorized": Problem(401, "Credentials required"),
    "invalid_token": Problem(401, "Invalid bearer token"),
    "invalid_api_key": Problem(401, "Invalid API key"),
    "client_certificate_required": Problem(401, "Client certificate required"),
    "forbidden": Problem(403, "Forbidden"),
    "forbidden_address": Problem(403, "Client address not allowed"),
    "cors_origin": Problem(403, "CORS origin not allowed"),
    "cors_method": Problem(403, "CORS method not allowed"),
    "cors_header": Problem(403, "CORS header not allowed"),
    "no_route": Problem(404, "No route matches"),
    "method_not_allowed": Problem(405, "Method not allowed"),
    "request_timeout": Problem(408, "Request timeout"),
    "body_too_large": Problem(413, "Request body too large"),
    "uri_too_long": Problem(414, "Request target too long"),
    "expectation_failed": Problem(417, "Expectation not supported"),
    "rate_limited": Problem(429, "Rate limit exceeded"),
    "headers_too_large": Problem(431, "Request head too large"),
    "too_many_headers": Problem(431, "Too many header fields"),
    "internal_error": Problem(500, "Internal gateway error"),
    "upstream_connect_failed": Problem(502, "Upstream connection failed"),
    "upstream_closed": Problem(502, "Upstream closed the connection"),
    "upstream_invalid_response": Problem(502, "Invalid upstream response"),
    "upstream_saturated": Problem(503, "Upstream saturated"),
    "no_endpoint": Problem(503, "No upstream endpoint available"),
    "circuit_open": Problem(503, "Circuit breaker open"),
    "rate_limiter_unavailable": Problem(503, "Rate limiter unavailable"),
    "upstream_connect_timeout": Problem(504, "Upstream connection timeout"),
    "upstream_timeout": Problem(504, "Upstream timeout"),
    "http_version_not_supported": Problem(505, "HTTP version not supported"),
}
"""Every code the data plane answers with, its status and title (docs/gateway.md#errors
lists them all; a test keeps the three in step)."""


def problem_type(code: str) -> str:
    """The ``type`` URI of the problem ``code``."""
    return PROBLEM_TYPE + code
