"""The users service: create, read, list, update and delete users; a new user is
announced as ``users.created`` through the transactional outbox.

Stored in SQL (``USERS_DATABASE_URL``; SQLite ``users.db`` by default), at the head
of its migrations (``meshgate db upgrade examples.shop.users.app``, or
``MESHGATE_MIGRATE=1`` to migrate when it starts), with a cache-aside for reads
(``USERS_CACHE_URL``; in memory by default, Redis in real deployments). Run it
with ``meshgate serve examples.shop.users.app:service``.

The in-memory cache is per process: with several instances, one may serve a user
that another just changed for up to ``USERS_CACHE_TTL`` seconds (2 by default).
With a shared Redis every instance invalidates the one entry, and the TTL can be
long (``USERS_CACHE_TTL=300``).
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

from fastapi import HTTPException, Query, Response
from fastapi import Path as PathParam
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from examples.shop.users.models import (
    MAX_ID,
    Base,
    User,
    UserCreated,
    UserIn,
    UserOut,
    UserPage,
    UserPatch,
)
from meshgate.data import Cache, CacheUnavailableError, Database
from meshgate.service import Service, problem_responses

log = logging.getLogger("shop.users")

MIGRATIONS = Path(__file__).with_name("migrations")
"""This service's Alembic migrations (``meshgate db upgrade`` runs them)."""

metadata = Base.metadata

UserId = Annotated[int, PathParam(ge=1, le=MAX_ID, description="The user's id.")]


def _conflict(email: str) -> HTTPException:
    return HTTPException(409, f"a user with email {email!r} already exists")


def _not_found(user_id: int) -> HTTPException:
    return HTTPException(404, f"no user has id {user_id}")


def create_service(
    database_url: str | None = None,
    cache_url: str | None = None,
    cache_ttl: float | None = None,
    cache_prefix: str = "users:",
) -> Service:
    """The users service on this database and cache (default: from the environment)."""
    cache_url = cache_url or os.environ.get("USERS_CACHE_URL", "memory://")
    if cache_ttl is None:
        default_ttl = "2" if cache_url.startswith("memory") else "300"
        cache_ttl = float(os.environ.get("USERS_CACHE_TTL", default_ttl))
    # With its migrations named, readiness fails (and the service will not start)
    # unless the database is at their head: a lost or replaced database says so.
    database = Database(
        database_url or os.environ.get("USERS_DATABASE_URL", "sqlite:///users.db"),
        name="users",
        migrations=MIGRATIONS,
    )
    cache = Cache(cache_url, prefix=cache_prefix, default_ttl=cache_ttl, name="users")
    service = Service("users", version="1.0.0", database=database, cache=cache)
    app = service.app
    # Declared here, at import: `meshgate db upgrade` then knows this service uses
    # events, and makes its outbox table too.
    service.events.topic("users.created")

    async def _load(user_id: int) -> dict[str, object]:
        async with database.session() as session:
            user = await session.get(User, user_id)
        if user is None:
            raise _not_found(user_id)  # raised, so that a miss is not cached
        return UserOut.model_validate(user).model_dump(mode="json")

    async def _forget(user_id: int) -> None:
        """Drop the cached copy; the write has committed, so a cache outage only
        means the old copy lives until its TTL ends."""
        try:
            await cache.delete(f"user:{user_id}")
        except CacheUnavailableError as exc:
            log.warning(
                "user %d changed but its cached copy stays until it expires: %s", user_id, exc
            )

    @app.post("/users", status_code=201, responses=problem_responses(409))
    async def create_user(body: UserIn, response: Response) -> UserOut:
        try:
            async with database.session() as session:
                user = User(email=body.email, name=body.name)
                session.add(user)
                await session.flush()
                out = UserOut.model_validate(user)
                # In the same transaction: the event exists exactly when the user does.
                await service.events.publish(
                    session,
                    "users.created",
                    UserCreated(id=out.id, email=out.email, name=out.name),
                    key=str(out.id),
                )
        except IntegrityError:
            raise _conflict(body.email) from None
        response.headers["Location"] = f"/users/{out.id}"
        return out

    @app.get("/users/{user_id}", responses=problem_responses(404))
    async def get_user(user_id: UserId) -> UserOut:
        found = await cache.get_or_load(f"user:{user_id}", lambda: _load(user_id))
        return UserOut.model_validate(found)

    @app.get("/users")
    async def list_users(
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        after: Annotated[
            int, Query(ge=0, le=MAX_ID, description="The last id of the previous page")
        ] = 0,
    ) -> UserPage:
        async with database.session() as session:
            rows = await session.scalars(
                select(User).where(User.id > after).order_by(User.id).limit(limit + 1)
            )
            users = list(rows)
        items = [UserOut.model_validate(u) for u in users[:limit]]
        return UserPage(items=items, next=items[-1].id if len(users) > limit else None)

    @app.patch("/users/{user_id}", responses=problem_responses(404, 409))
    async def update_user(user_id: UserId, body: UserPatch) -> UserOut:
        changes = body.model_dump(exclude_none=True)
        try:
            async with database.session() as session:
                user = await session.get(User, user_id)
                if user is None:
                    raise _not_found(user_id)
                for field, value in changes.items():
                    setattr(user, field, value)
                user.updated_at = datetime.now(UTC)
                await session.flush()
                out = UserOut.model_validate(user)
        except IntegrityError:
            raise _conflict(str(changes.get("email"))) from None
        await _forget(user_id)
        return out

    @app.delete("/users/{user_id}", status_code=204, responses=problem_responses(404))
    async def delete_user(user_id: UserId) -> Response:
        async with database.session() as session:
            user = await session.get(User, user_id)
            if user is None:
                raise _not_found(user_id)
            await session.delete(user)
        await _forget(user_id)
        return Response(status_code=204)

    return service


service = create_service()
app = service.app
