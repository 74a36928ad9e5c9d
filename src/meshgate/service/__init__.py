"""The service SDK: build a meshgate service on FastAPI, and call other services.

::

    from meshgate.data import Database
    from meshgate.service import Service

    service = Service("users", database=Database("sqlite:///users.db"))
    app = service.app

    @app.get("/users/{user_id}")
    async def get_user(user_id: int) -> dict[str, object]: ...

    # elsewhere, in the web service:
    users = service.client("users")
    response = await users.get("/users/42")

See docs/services.md.
"""

from meshgate.service.app import Check, Service
from meshgate.service.client import ServiceClient
from meshgate.service.context import (
    TraceContext,
    current_caller,
    current_deadline,
    current_request_id,
    current_trace,
    remaining,
)
from meshgate.service.errors import (
    DeadlineExceededError,
    IdentityError,
    NoRegistryError,
    ServiceError,
    ServiceStartupError,
    ServiceUnavailableError,
)
from meshgate.service.identity import IdentitySigner, verify_identity
from meshgate.service.logs import JsonFormatter, configure_logging
from meshgate.service.problems import Problem, ProblemError, problem_responses

__all__ = [
    "Check",
    "DeadlineExceededError",
    "IdentityError",
    "IdentitySigner",
    "JsonFormatter",
    "NoRegistryError",
    "Problem",
    "ProblemError",
    "Service",
    "ServiceClient",
    "ServiceError",
    "ServiceStartupError",
    "ServiceUnavailableError",
    "TraceContext",
    "configure_logging",
    "current_caller",
    "current_deadline",
    "current_request_id",
    "current_trace",
    "problem_responses",
    "remaining",
    "verify_identity",
]
