"""The web service: the API the shop's front end calls, built from the users
service through the platform's client (discovery, balancing, deadlines, retries,
circuit breaking and service identity), never by its address.

Run it with ``meshgate serve examples.shop.web.app:service``.
"""

from __future__ import annotations

import os
import time
from typing import Annotated, Any

import httpx
import jwt
from fastapi import Header, HTTPException, Path
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel

from examples.shop.users.models import MAX_ID
from meshgate.service import Service, problem_responses

service = Service("web", version="1.0.0")
app = service.app
users = service.client("users", timeout=2.0)


class Signup(BaseModel):
    email: str
    name: str


UserId = Annotated[int, Path(ge=1, le=MAX_ID, description="The user's id.")]


def _relay(response: httpx.Response) -> Response:
    """The users service's answer, passed on as it is: its errors are already clear
    problems (with users' request id, which is this request's too)."""
    return Response(
        response.content,
        status_code=response.status_code,
        media_type=response.headers.get("content-type"),
    )


@app.post("/api/demo-token", response_class=PlainTextResponse, responses=problem_responses(404))
async def demo_token(sub: str = "demo") -> str:
    """A JWT the gateway accepts on user writes, for trying the shop locally. Only
    when SHOP_DEMO_TOKEN_SECRET is set (``meshgate up`` of the shop sets it to the
    demo secret of gateway.yaml); a real system gets its tokens from its identity
    provider and leaves this off."""
    secret = os.environ.get("SHOP_DEMO_TOKEN_SECRET")
    if not secret:
        raise HTTPException(404, "demo tokens are off; set SHOP_DEMO_TOKEN_SECRET to enable them")
    now = int(time.time())
    claims = {"sub": sub, "iss": "shop-demo", "iat": now, "exp": now + 3600}
    return jwt.encode(claims, secret, algorithm="HS256")


@app.get("/api/profile/{user_id}", responses=problem_responses(404))
async def profile(user_id: UserId) -> Any:
    """A user's profile page data."""
    response = await users.get(f"/users/{user_id}")
    if response.status_code != 200:
        return _relay(response)
    user = response.json()
    first = (user["name"].split() or [user["name"]])[0]
    return {"user": user, "greeting": f"Hello, {first}!", "served_by": "web"}


@app.get("/api/home", responses=problem_responses(502))
async def home() -> dict[str, Any]:
    """The newest users, for the home page."""
    response = await users.get("/users", params={"limit": 5})
    if response.status_code != 200:
        raise HTTPException(502, f"users answered {response.status_code}: {response.text[:200]}")
    return {"newest": response.json()["items"]}


@app.post("/api/signup", status_code=201, responses=problem_responses(409, 422))
async def signup(body: Signup, idempotency_key: str | None = Header(default=None)) -> Any:
    """Create an account. With an ``Idempotency-Key`` the call to users may be
    retried on another instance when the first one fails."""
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    response = await users.post("/users", json=body.model_dump(), headers=headers)
    if response.status_code != 201:
        return _relay(response)
    return {"user": response.json(), "welcome": f"Welcome, {body.name}!"}
