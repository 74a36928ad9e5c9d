"""The test helpers of meshgate.service.testing."""

from __future__ import annotations

import pytest

from meshgate.service import Service
from meshgate.service.testing import in_process, serving, use_endpoints


async def test_use_endpoints_redirects_a_client_made_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pattern of docs/services.md: ``users = service.client("users")`` at module
    level, then the test points that very client at a fake."""
    monkeypatch.delenv("MESHGATE_REGISTRY_URL", raising=False)
    web = Service("web")
    users = web.client("users")  # module level in a real service

    @web.app.get("/profile/{user_id}")
    async def profile(user_id: int) -> object:
        return (await users.get(f"/users/{user_id}")).json()

    fake = Service("users")

    @fake.app.get("/users/{user_id}")
    async def get(user_id: int) -> dict[str, object]:
        return {"id": user_id, "name": "Ada"}

    async with serving(fake) as address:
        assert use_endpoints(web, "users", [address]) is users
        async with in_process(web) as client:
            response = await client.get("/profile/7")
    assert response.json() == {"id": 7, "name": "Ada"}
