"""RFC 9457 problem details: the one error format of every service built on the SDK.

Every error a service answers with is ``application/problem+json``::

    {"type": "https://meshgate.dev/problems/validation_failed",
     "title": "Request validation failed", "status": 422,
     "detail": "1 field is not valid: body.email: value is not a valid email address",
     "instance": "/users", "error": "validation_failed",
     "request_id": "4bf92f35...", "errors": [{"loc": ["body", "email"], ...}]}

- ``type`` is ``https://meshgate.dev/problems/<code>`` for the problems the platform
  itself defines (:data:`PROBLEMS`, listed in docs/services.md#errors; the gateway's
  use the same base), and ``about:blank`` for an ``HTTPException`` a handler raises,
  whose meaning is its status alone (RFC 9457 section 4.2.1): its ``title`` is then
  the status's reason phrase.
- ``instance`` is the request's path (never its query, which may hold secrets).
- Extension members: ``error`` (a snake_case code: the platform's, the one given to
  :class:`ProblemError`, or the reason phrase's), ``request_id`` (also in the
  ``X-Request-ID`` header and every log line of the request), and per problem
  ``errors`` (validation) or ``dependency`` (503).

:func:`install` registers the handlers; :func:`document` makes the OpenAPI document
say so; :func:`problem_responses` documents a route's own errors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, NamedTuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.routing import Match

from meshgate.errors import PROBLEM_TYPE
from meshgate.service.context import current_request_id
from meshgate.service.errors import (
    DeadlineExceededError,
    IdentityError,
    ProblemError,
    ServiceError,
    ServiceUnavailableError,
)

if TYPE_CHECKING:
    from starlette.types import Scope

__all__ = [
    "DEFAULT_RESPONSES",
    "MEDIA_TYPE",
    "PROBLEMS",
    "PROBLEM_TYPE",
    "FieldError",
    "Problem",
    "ProblemError",
    "ProblemResponse",
    "ValidationProblem",
    "document",
    "install",
    "problem",
    "problem_responses",
    "problem_type",
]


MEDIA_TYPE = "application/problem+json"
"""The media type of every error a service answers with."""


class Kind(NamedTuple):
    """One problem the platform defines: its usual status and its title."""

    status: int
    title: str


PROBLEMS: dict[str, Kind] = {
    "validation_failed": Kind(422, "Request validation failed"),
    "no_route": Kind(404, "No route matches"),
    "method_not_allowed": Kind(405, "Method not allowed"),
    "identity_required": Kind(401, "Service identity required"),
    "invalid_identity": Kind(401, "Invalid service identity"),
    "identity_not_configured": Kind(401, "Service identity not configured"),
    "caller_forbidden": Kind(403, "Calling service not allowed"),
    "internal_error": Kind(500, "Internal server error"),
    "data_error": Kind(500, "Data layer error"),
    "dependency_unavailable": Kind(503, "Dependency unavailable"),
    "database_not_migrated": Kind(503, "Database not at the expected schema revision"),
    "statement_timeout": Kind(503, "Database statement timeout"),
    "deadline_exceeded": Kind(504, "Deadline exceeded"),
}
"""Every problem code the SDK answers with, its status and title (docs/services.md
lists them all; a test keeps the two in step)."""

_RESERVED = frozenset({"type", "title", "status", "detail", "instance", "error", "request_id"})
_WORD_RE = re.compile(r"[^a-z0-9]+")
_MAX_LISTED = 5


def problem_type(code: str) -> str:
    """The ``type`` URI of the platform's problem ``code``."""
    return PROBLEM_TYPE + code


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error" if status >= 400 else "Status"


def _code_of(status: int) -> str:
    return _WORD_RE.sub("_", _phrase(status).lower()).strip("_")


def problem(
    status: int,
    detail: str,
    *,
    code: str | None = None,
    type: str | None = None,  # noqa: A002 - the RFC 9457 member's name
    title: str | None = None,
    instance: str | None = None,
    **extensions: Any,
) -> dict[str, Any]:
    """The body of a problem: the platform's ``code`` (see :data:`PROBLEMS`) gives
    its ``type`` and ``title``; without one, ``type`` is ``about:blank`` and ``title``
    the status's reason phrase. ``request_id`` is the current request's."""
    kind = PROBLEMS.get(code) if code is not None else None
    uri = type
    if uri is None:
        uri = problem_type(code) if kind is not None and code is not None else "about:blank"
    if title is None:
        title = kind.title if kind is not None else _phrase(status)
    body: dict[str, Any] = {"type": uri, "title": title, "status": status, "detail": detail}
    if instance is not None:
        body["instance"] = instance
    body["error"] = code or _code_of(status)
    body["request_id"] = current_request_id.get()
    body.update((k, v) for k, v in extensions.items() if k not in _RESERVED)
    return body


class ProblemResponse(JSONResponse):
    """A JSON response of media type ``application/problem+json``."""

    media_type = MEDIA_TYPE


def problem_response(
    scope: Scope,
    status: int,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    **members: Any,
) -> Response:
    """The problem answering the request of ``scope`` (its path is the ``instance``);
    no body for the statuses that have none (204, 304)."""
    if status < 200 or status in (204, 304):
        return Response(status_code=status, headers=dict(headers or {}))
    body = problem(status, detail, instance=scope.get("path"), **members)
    return ProblemResponse(body, status_code=status, headers=dict(headers or {}))


# -- the models that document problems in OpenAPI


class Problem(BaseModel):
    """An RFC 9457 problem: what every error response of a meshgate service holds."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(
        description="A URI naming the kind of problem: https://meshgate.dev/problems/<code> "
        "for the platform's, about:blank when the status says it all."
    )
    title: str = Field(description="A short summary of the kind of problem.")
    status: int = Field(description="The HTTP status.")
    detail: str = Field(description="What went wrong this time, and what to do about it.")
    instance: str | None = Field(default=None, description="The request's path.")
    error: str = Field(description="A snake_case code of the problem.")
    request_id: str | None = Field(description="The request's id (X-Request-ID), as logged.")


class FieldError(BaseModel):
    """One invalid part of a request."""

    loc: list[str | int] = Field(description='Where: ["body", "email"], ["path", "user_id"].')
    msg: str = Field(description="What is wrong with it.")
    type: str = Field(description="The kind of error (pydantic's error type).")


class ValidationProblem(Problem):
    """A request that is not valid (422): every invalid field, in ``errors``."""

    errors: list[FieldError] = Field(description="Every invalid part of the request.")


_DESCRIPTIONS = {
    400: "The body cannot be read (not UTF-8, say).",
    404: "Not found (also: no route matches the path).",
    409: "Conflicts with the current state.",
    422: "The request is not valid; `errors` lists every invalid field.",
    500: "An unexpected error; its traceback is logged with the request id.",
    503: "A dependency (the database, the cache, a called service) is unavailable; "
    "`dependency` names it. Retry later.",
    504: "The caller's deadline passed (X-Meshgate-Deadline-Ms), or a call made for it "
    "ran out of time.",
}


def problem_responses(
    *statuses: int, descriptions: Mapping[int, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` documenting the problems a route may answer with::

        @app.get("/users/{user_id}", responses=problem_responses(404))

    ``descriptions`` replace the default text of a status (``{409: "email taken"}``).
    """
    given = descriptions or {}
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        text = given.get(status) or _DESCRIPTIONS.get(status) or _phrase(status)
        model = ValidationProblem if status == 422 else Problem
        out[status] = {"model": model, "description": text}
    return out


DEFAULT_RESPONSES = problem_responses(500, 503, 504)
"""What every route of a service documents: it may fail unexpectedly, lose a
dependency, or run out of time."""


def document(schema: dict[str, Any]) -> dict[str, Any]:
    """Make an OpenAPI document (FastAPI's) say what the handlers answer: errors as
    ``application/problem+json``, and 422 as :class:`ValidationProblem` rather than
    FastAPI's ``HTTPValidationError``. Changes ``schema`` and returns it."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    ref = "#/components/schemas/"
    problem_refs = {ref + "Problem", ref + "ValidationProblem", ref + "HTTPValidationError"}
    needed = False
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            responses = operation.get("responses") if isinstance(operation, dict) else None
            if not responses:
                continue
            if "requestBody" in operation and "400" not in responses:
                # FastAPI answers 400 for a body it cannot decode (422 for bad JSON).
                responses["400"] = {
                    "description": _DESCRIPTIONS[400],
                    "content": {"application/json": {"schema": {"$ref": ref + "Problem"}}},
                }
            for status, response in responses.items():
                content = response.get("content", {})
                json_content = content.get("application/json")
                if json_content is None or json_content.get("schema", {}).get("$ref") not in (
                    problem_refs
                ):
                    continue
                name = "ValidationProblem" if str(status) == "422" else "Problem"
                content.pop("application/json")
                content[MEDIA_TYPE] = {"schema": {"$ref": ref + name}}
                if str(status) == "422" and response.get("description") == "Validation Error":
                    response["description"] = _DESCRIPTIONS[422]
                needed = True
    if needed:
        models = ValidationProblem.model_json_schema(ref_template=ref + "{model}")
        components.update(models.pop("$defs", {}))
        components["ValidationProblem"] = models
        components["Problem"] = Problem.model_json_schema(ref_template=ref + "{model}")
    text = repr(schema.get("paths", {}))
    for unused in ("HTTPValidationError", "ValidationError"):
        if ref + unused not in text and unused in components:
            del components[unused]
    return schema


# -- the handlers


def _validation_detail(errors: Sequence[Mapping[str, Any]]) -> str:
    count = len(errors)
    parts = [
        f"{'.'.join(str(p) for p in e.get('loc', ())) or '(request)'}: {e.get('msg', '')}"
        for e in errors[:_MAX_LISTED]
    ]
    more = f"; and {count - _MAX_LISTED} more" if count > _MAX_LISTED else ""
    noun = "part of the request is" if count == 1 else "parts of the request are"
    return f"{count} {noun} not valid: " + "; ".join(parts) + more


async def _validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)  # noqa: S101 - registered for it only
    # loc, msg and type only: the input and context may be large, or secret.
    errors = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    return problem_response(
        request.scope, 422, _validation_detail(errors), code="validation_failed", errors=errors
    )


async def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)  # noqa: S101 - registered for it only
    status = exc.status_code
    headers = exc.headers
    scope = request.scope
    if isinstance(exc, ProblemError):
        return problem_response(
            scope,
            status,
            exc.detail,
            headers=headers,
            code=exc.code,
            type=exc.type,
            title=exc.title,
            **exc.extensions,
        )
    method, path = scope.get("method", ""), scope.get("path", "")
    if status == 404 and "route" not in scope:
        text = f"no route matches {method} {path}"
        return problem_response(scope, 404, text, headers=headers, code="no_route")
    if status == 405:
        # Starlette's Allow names the methods of the first route of the path only.
        allowed = ", ".join(_methods_of(request)) or (headers or {}).get("Allow", "")
        text = f"{method} is not allowed on {path}; allowed: {allowed or 'none'}"
        headers = {**(headers or {}), "Allow": allowed}
        return problem_response(scope, 405, text, headers=headers, code="method_not_allowed")
    given: Any = exc.detail  # FastAPI's HTTPException takes any JSON value
    extensions: dict[str, Any] = {}
    if isinstance(given, str):
        text = given
    elif isinstance(given, Mapping):
        # HTTPException(409, {"detail": ..., "field": ...}): members of the problem.
        extensions = {str(k): v for k, v in given.items()}
        text = str(extensions.pop("detail", None) or _phrase(status))
    else:
        extensions = {"errors": given}
        text = _phrase(status)
    return problem_response(scope, status, text, headers=headers, **extensions)


def _methods_of(request: Request) -> list[str]:
    """Every method some route of the request's path takes."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        route_methods = getattr(route, "methods", None)
        if route_methods and route.matches(request.scope)[0] is not Match.NONE:
            methods.update(route_methods)
    return sorted(methods)


def data_problem(exc: Exception) -> tuple[str, str]:
    """The problem code and the dependency of a data layer error."""
    from meshgate.data import errors  # noqa: PLC0415 - the sql extra is optional

    if isinstance(exc, errors.CacheUnavailableError):
        return "dependency_unavailable", "cache"
    if isinstance(exc, errors.StatementTimeoutError):
        return "statement_timeout", "database"
    if isinstance(exc, errors.UnmigratedDatabaseError):
        return "database_not_migrated", "database"
    if isinstance(exc, errors.DatabaseUnavailableError):
        return "dependency_unavailable", "database"
    return "data_error", "database"


def install(app: FastAPI, log: Any) -> None:
    """Answer every error of ``app`` with a problem: HTTP exceptions, validation
    errors, the data layer's and the SDK's errors, and anything unhandled (whose
    traceback the service's middleware logs). ``log`` is the logger for dependency
    failures."""
    from meshgate.data.errors import DataError  # noqa: PLC0415 - the sql extra is optional

    async def data_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, DataError)  # noqa: S101 - registered for it only
        code, dependency = data_problem(exc)
        log.warning("%s: %s", dependency, exc)
        return problem_response(
            request.scope, exc.status, str(exc), code=code, dependency=dependency
        )

    async def service_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)  # noqa: S101 - registered for it only
        if isinstance(exc, ServiceUnavailableError):
            log.warning("%s", exc)
            code = "dependency_unavailable"
        elif isinstance(exc, DeadlineExceededError):
            code = "deadline_exceeded"
        elif isinstance(exc, IdentityError):
            code = "invalid_identity"
        else:
            code = "internal_error"
        return problem_response(request.scope, exc.status, str(exc), code=code)

    async def unhandled(request: Request, exc: Exception) -> Response:
        # The middleware outside logs the traceback, once, with the request id.
        return problem_response(request.scope, 500, internal_detail(), code="internal_error")

    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(DataError, data_error)
    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(Exception, unhandled)


def internal_detail() -> str:
    """The ``detail`` of a 500: nothing of the error itself, which may hold secrets."""
    request_id = current_request_id.get()
    where = f" with request id {request_id}" if request_id else ""
    return f"an unexpected error occurred; it was logged{where}"
