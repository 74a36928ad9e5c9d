"""The shared registry: every gateway node keeps its registry state in one Redis.

Keys (all hash-tagged ``{<prefix>}`` so they share one Redis Cluster slot, which
lets the Lua scripts touch them together):

* ``{P}:index``: the registry index (a counter);
* ``{P}:services``: hash of service name to its modify index (kept when a service
  empties, so its watchers see it empty);
* ``{P}:svc:<service>``: hash of instance id to ``"<index> <registered ms>
  <heartbeat ms> <ttl ms> <spec JSON>"``;
* ``{P}:deadlines``: sorted set of ``<service>/<id>`` by TTL deadline (ms);
* ``{P}:changes``: the pub/sub channel of change notices (``"<index> <service>"``).

Every change, its index bump and its notice happen in one Lua script, so they are
atomic. Time comes from Redis (``TIME``), so the gateway nodes' clocks do not matter.
Every node runs the reaper; the eviction script removes an instance only if it is
still due, so two nodes never evict one instance twice. Watchers are woken by
pub/sub; the reaper also reads the index every ``reap_interval`` and wakes the
watchers of any service that changed, so a lost notice delays a watcher by at most
that long.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisError
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "the Redis registry needs the redis package; install it with pip install 'meshgate[redis]'"
    ) from exc

from pydantic import ValidationError

from meshgate.registry.errors import RegistryClosedError, RegistryUnavailableError
from meshgate.registry.model import Instance, InstanceSpec, Snapshot, check_name
from meshgate.registry.store import BaseRegistry, backoff, cancel_task

__all__ = ["RedisRegistry"]

log = logging.getLogger("meshgate.registry")

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_BUMP = """
local function bump(service)
  local idx = redis.call('INCR', KEYS[1])
  redis.call('HSET', KEYS[2], service, idx)
  redis.call('PUBLISH', ARGV[1], string.format('%.0f %s', idx, service))
  return idx
end
"""

# KEYS: index, services, deadlines, service hash
# ARGV: channel, service, id, spec JSON, ttl ms
# Returns the instance's record.
_REGISTER = (
    _NOW
    + _BUMP
    + """
local member = ARGV[2] .. '/' .. ARGV[3]
local registered = now
local old = redis.call('HGET', KEYS[4], ARGV[3])
if old then
  local idx, reg, _, _, spec = string.match(old, '^(%d+) (%d+) (%d+) (%d+) (.*)$')
  local deadline = tonumber(redis.call('ZSCORE', KEYS[3], member) or '0')
  if deadline > now then
    registered = tonumber(reg)
    if spec == ARGV[4] then
      -- Alive with the same spec: a heartbeat, no change.
      local record = string.format('%s %s %.0f %s %s', idx, reg, now, ARGV[5], spec)
      redis.call('HSET', KEYS[4], ARGV[3], record)
      redis.call('ZADD', KEYS[3], string.format('%.0f', now + tonumber(ARGV[5])), member)
      return record
    end
  end
end
local idx = bump(ARGV[2])
local record = string.format('%.0f %.0f %.0f %s %s', idx, registered, now, ARGV[5], ARGV[4])
redis.call('HSET', KEYS[4], ARGV[3], record)
redis.call('ZADD', KEYS[3], string.format('%.0f', now + tonumber(ARGV[5])), member)
return record
"""
)

# KEYS: index, services, deadlines, service hash
# ARGV: channel, service, id
# Returns the instance's record, or nil if it is not registered (or just lapsed).
_HEARTBEAT = (
    _NOW
    + _BUMP
    + """
local member = ARGV[2] .. '/' .. ARGV[3]
local old = redis.call('HGET', KEYS[4], ARGV[3])
if not old then
  return false
end
local deadline = tonumber(redis.call('ZSCORE', KEYS[3], member) or '0')
if deadline <= now then
  -- Lapsed, not reaped yet: evict now, so a late heartbeat never counts.
  redis.call('HDEL', KEYS[4], ARGV[3])
  redis.call('ZREM', KEYS[3], member)
  bump(ARGV[2])
  return false
end
local idx, reg, _, ttl, spec = string.match(old, '^(%d+) (%d+) (%d+) (%d+) (.*)$')
local record = string.format('%s %s %.0f %s %s', idx, reg, now, ttl, spec)
redis.call('HSET', KEYS[4], ARGV[3], record)
redis.call('ZADD', KEYS[3], string.format('%.0f', now + tonumber(ttl)), member)
return record
"""
)

# KEYS: index, services, deadlines, service hash
# ARGV: channel, service, id
# Returns 1 if the instance was removed, 0 if it was not registered.
_DEREGISTER = (
    _BUMP
    + """
if redis.call('HDEL', KEYS[4], ARGV[3]) == 0 then
  return 0
end
redis.call('ZREM', KEYS[3], ARGV[2] .. '/' .. ARGV[3])
bump(ARGV[2])
return 1
"""
)

# KEYS: index, services, deadlines
# ARGV: channel, service hash key prefix, limit
# Returns {index, {evicted members}}. Only due members are removed, each once: two
# nodes reaping at the same moment run one after the other and the second finds
# nothing left to do.
_REAP = (
    _NOW
    + _BUMP
    + """
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', string.format('%.0f', now),
                       'LIMIT', 0, tonumber(ARGV[3]))
local evicted = {}
for _, member in ipairs(due) do
  local slash = string.find(member, '/', 1, true)
  local service = string.sub(member, 1, slash - 1)
  redis.call('ZREM', KEYS[3], member)
  if redis.call('HDEL', ARGV[2] .. service, string.sub(member, slash + 1)) == 1 then
    bump(service)
    evicted[#evicted + 1] = member
  end
end
return {tonumber(redis.call('GET', KEYS[1]) or '0'), evicted}
"""
)

# KEYS: index, services[, service hash]
# ARGV: service hash key prefix[, service]
# Returns {index, service modify index (or index), {service, {id, record, ...}, ...}}
_SNAPSHOT = """
local top = tonumber(redis.call('GET', KEYS[1]) or '0')
if ARGV[2] then
  local modified = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0')
  return {top, modified, {ARGV[2], redis.call('HGETALL', KEYS[3])}}
end
local out = {}
for _, name in ipairs(redis.call('HKEYS', KEYS[2])) do
  local rows = redis.call('HGETALL', ARGV[1] .. name)
  if #rows > 0 then
    out[#out + 1] = name
    out[#out + 1] = rows
  end
end
return {top, top, out}
"""

_REAP_BATCH = 256
_URL_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*@")


class RedisRegistry(BaseRegistry):
    """A registry whose state lives in Redis, shared by every gateway node that uses
    the same ``url`` and ``prefix``.

    Operations raise :class:`RegistryUnavailableError` while Redis cannot be reached
    (within ``timeout`` seconds) and work again as soon as it is back; watchers
    (``wait``, ``changes``) resume where they were. The state is Redis's: what Redis
    loses (a restart without persistence, a failover to a lagging replica) the
    registry loses, and instances register again at their next heartbeat.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "meshgate:registry",
        reap_interval: float = 0.2,
        timeout: float = 2.0,
    ) -> None:
        super().__init__()
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(
                f"prefix={prefix!r}: give a non-empty key prefix without braces "
                "(the registry adds its own hash tag)"
            )
        if not 0 < reap_interval <= 1:
            raise ValueError(
                f"reap_interval={reap_interval!r}: give seconds in (0, 1]; watchers must "
                "hear of an eviction within a second"
            )
        self.url = url
        self.prefix = prefix
        self.reap_interval = reap_interval
        self.timeout = timeout
        self.evictions = 0
        """Instances this node's reaper evicted (another node may evict others)."""
        tag = "{" + prefix + "}"
        self._keys = [f"{tag}:index", f"{tag}:services", f"{tag}:deadlines"]
        self._service_prefix = f"{tag}:svc:"
        self._channel = f"{tag}:changes"
        self._shown_url = _URL_PASSWORD.sub(r"\1***@", url)
        self._redis: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._seen_index = -1
        self._seen_services: dict[str, int] = {}
        self._failing = False

    async def start(self) -> None:
        if self._started or self._closed:
            return
        self._redis = aioredis.Redis.from_url(
            self.url,
            decode_responses=True,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            # One quick retry replaces a pooled connection that Redis closed; an
            # outage must surface at once as RegistryUnavailableError, not as a
            # caller stuck in redis-py's retries.
            retry=Retry(NoBackoff(), 1),
        )
        for name, source in (
            ("register", _REGISTER),
            ("heartbeat", _HEARTBEAT),
            ("deregister", _DEREGISTER),
            ("reap", _REAP),
            ("snapshot", _SNAPSHOT),
        ):
            self._scripts[name] = self._redis.register_script(source)
        self._started = True
        try:
            await self._call(self._redis.ping())
        except RegistryUnavailableError as exc:
            # A gateway starts while Redis restarts: run, and recover when it is back.
            log.warning("registry: %s", exc)
            self._failing = True
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._reap_loop(), name="meshgate-registry-reaper"),
            loop.create_task(self._listen(), name="meshgate-registry-notices"),
        ]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._notifier.close()
        for task in self._tasks:
            await cancel_task(task)
        if self._redis is not None:
            await self._redis.aclose()

    # -- the contract

    async def register(self, service: str, instance_id: str, spec: InstanceSpec) -> Instance:
        check_name(service, "service")
        check_name(instance_id, "instance id")
        self._check_open()
        record = await self._script(
            "register",
            self._service_keys(service),
            [
                self._channel,
                service,
                instance_id,
                spec.model_dump_json(),
                f"{spec.ttl * 1000:.0f}",
            ],
        )
        return _instance(service, instance_id, record, spec)

    async def heartbeat(self, service: str, instance_id: str) -> Instance | None:
        check_name(service, "service")
        check_name(instance_id, "instance id")
        self._check_open()
        record = await self._script(
            "heartbeat", self._service_keys(service), [self._channel, service, instance_id]
        )
        return None if record is None else _instance(service, instance_id, record)

    async def deregister(self, service: str, instance_id: str) -> bool:
        check_name(service, "service")
        check_name(instance_id, "instance id")
        self._check_open()
        removed = await self._script(
            "deregister", self._service_keys(service), [self._channel, service, instance_id]
        )
        return bool(removed)

    async def _read(self, service: str | None) -> tuple[Snapshot, int]:
        if service is None:
            keys, args = self._keys[:2], [self._service_prefix]
        else:
            keys = [*self._keys[:2], self._service_prefix + service]
            args = [self._service_prefix, service]
        top, modified, groups = await self._script("snapshot", keys, args)
        instances = []
        for name, rows in zip(groups[::2], groups[1::2], strict=True):
            for instance_id, record in sorted(zip(rows[::2], rows[1::2], strict=True)):
                try:
                    instances.append(_instance(name, instance_id, record))
                except (ValueError, ValidationError) as exc:
                    log.warning("registry: skipping unreadable %s/%s: %s", name, instance_id, exc)
        instances.sort(key=lambda i: (i.service, i.id))
        return Snapshot(index=modified, instances=tuple(instances), service=service), top

    # -- internals

    @property
    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            raise RegistryClosedError("the registry is not started")
        return self._redis

    def _service_keys(self, service: str) -> list[str]:
        return [*self._keys, self._service_prefix + service]

    async def _script(self, name: str, keys: list[str], args: list[str]) -> Any:
        return await self._call(self._scripts[name](keys=keys, args=args))

    async def _call(self, awaitable: Any) -> Any:
        try:
            result = await awaitable
        except (RedisError, OSError) as exc:
            if self._closed:
                raise RegistryClosedError("the registry is closed") from exc
            raise RegistryUnavailableError(
                f"Redis at {self._shown_url} is unavailable ({type(exc).__name__}: {exc}); "
                "the registry works again as soon as Redis is back"
            ) from exc
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # redis-py waits with asyncio.wait_for, which on Python 3.11 swallows a
            # cancellation that lands as the reply arrives: honour it here, or a
            # cancelled reaper or long poll would carry on.
            raise asyncio.CancelledError
        return result

    async def _reap_loop(self) -> None:
        while not self._closed:
            try:
                await self._reap()
            except RegistryClosedError:
                return
            except RegistryUnavailableError as exc:
                if not self._failing:
                    log.warning("registry: %s", exc)
                self._failing = True
            else:
                if self._failing:
                    log.info("registry: Redis at %s is reachable again", self._shown_url)
                    self._failing = False
                    self._notifier.notify(None)
            await asyncio.sleep(self.reap_interval)

    async def _reap(self) -> None:
        """Evict what is due; wake the watchers of services changed by anyone."""
        while True:
            top, evicted = await self._script(
                "reap", self._keys, [self._channel, self._service_prefix, str(_REAP_BATCH)]
            )
            self.evictions += len(evicted)
            for member in evicted:
                log.info("registry: evicted %s (no heartbeat within its TTL)", member)
            if len(evicted) < _REAP_BATCH:
                break
        if top == self._seen_index:
            return
        # The index moved: find which services changed, in case their pub/sub notice
        # was lost (a dropped subscription, a notice published while reconnecting).
        services = await self._call(self._client.hgetall(self._keys[1]))
        seen = {name: int(value) for name, value in services.items()}
        if self._seen_index < 0 or top < self._seen_index:
            # The first look (a change may have slipped by before we subscribed), or
            # Redis lost its data: everyone re-reads.
            self._notifier.notify(None)
        else:
            for name, modified in seen.items():
                if modified > self._seen_services.get(name, 0):
                    self._notifier.notify(name)
        self._seen_index, self._seen_services = top, seen

    async def _listen(self) -> None:
        """Wake watchers on change notices; resubscribe after a lost connection."""
        failures = 0
        while not self._closed:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                if failures:
                    # Notices published while we were away are gone: re-read.
                    self._notifier.notify(None)
                failures = 0
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        _, _, service = str(message["data"]).partition(" ")
                        self._notifier.notify(service or None)
            except (RedisError, OSError) as exc:
                failures += 1
                log.debug("registry: change notices interrupted: %s", exc)
            finally:
                # redis-py leaves PubSub.aclose untyped; name its type here.
                close_pubsub: Callable[[], Awaitable[None]] = pubsub.aclose
                try:
                    await close_pubsub()
                except (RedisError, OSError) as exc:
                    log.debug("registry: closing the subscription: %s", exc)
            await asyncio.sleep(backoff(failures, cap=2.0))


def _instance(
    service: str, instance_id: str, record: str, spec: InstanceSpec | None = None
) -> Instance:
    """The instance a stored record describes."""
    index, registered, heartbeat, _ttl, spec_json = record.split(" ", 4)
    if spec is None:
        spec = InstanceSpec.model_validate(json.loads(spec_json))
    return Instance.build(
        service,
        instance_id,
        spec,
        registered_at=datetime.fromtimestamp(int(registered) / 1000, UTC),
        last_heartbeat=datetime.fromtimestamp(int(heartbeat) / 1000, UTC),
        index=int(index),
    )
