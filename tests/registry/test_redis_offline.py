"""The Redis registry when Redis cannot be reached (needs no Redis)."""

from __future__ import annotations

import time

import pytest

from meshgate.registry import InstanceSpec, RegistryUnavailableError
from meshgate.registry.redis import RedisRegistry
from tests.registry.conftest import free_port


async def test_operations_fail_fast_with_unavailable_and_hide_the_password() -> None:
    registry = RedisRegistry(f"redis://user:hunter2@127.0.0.1:{free_port()}/0", timeout=0.5)
    await registry.start()  # starts anyway: Redis may be restarting
    try:
        started = time.monotonic()
        with pytest.raises(RegistryUnavailableError) as caught:
            await registry.register("users", "a", InstanceSpec(address="10.0.0.1:80"))
        assert time.monotonic() - started < 2
        assert "hunter2" not in str(caught.value)
        assert "user:***@" in str(caught.value)
        assert "works again as soon as Redis is back" in str(caught.value)
    finally:
        await registry.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"prefix": "a{b}"}, "without braces"), ({"reap_interval": 5}, "within a second")],
)
def test_bad_settings_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RedisRegistry("redis://127.0.0.1:6379/0", **kwargs)  # type: ignore[arg-type]
