"""Rate limiting with GCRA (the generic cell rate algorithm).

GCRA keeps one value per key, the theoretical arrival time (TAT): with an emission
interval T = 1 / rate and a tolerance tau = burst x T, a request at time ``now`` is
allowed when ``now >= TAT - tau``, and then TAT = max(TAT, now) + T. It is exact,
smooth, and needs one stored number per key.

Local mode counts in the worker (exact within it); a reload that keeps a route's
name and rate_limit settings keeps its counts. Redis mode runs the same rule in a
Lua script, one round trip per request, with Redis's own clock, so it is exact
across workers and gateway nodes; keys are hash-tagged (``{...}``) for Redis
Cluster. The script goes by its SHA1 (EVALSHA); a request that finds Redis's script
cache empty (a Redis restart, SCRIPT FLUSH) is sent again with the whole script, so
it does not fail. When Redis cannot be reached the route's ``on_redis_error``
decides (let requests through, or refuse them with 503); each such event is logged
(at most every 10 s) and counted in ``meshgate_gateway_rate_limit_redis_errors``,
as refusals (429) are in ``meshgate_gateway_rate_limited``.

Responses carry ``RateLimit-Policy`` and ``RateLimit`` (IETF draft
httpapi-ratelimit-headers); refused requests get 429 with ``Retry-After``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import weakref
from functools import partial

from meshgate.config.model import RateLimitSettings
from meshgate.errors import ConfigError, ConfigIssue
from meshgate.gateway.contract import BuildContext, FilterExchange, Verdict, reply
from meshgate.gateway.filters.ip import client_address
from meshgate.gateway.resp import FollowUp, Pending, RedisError, RespClient

__all__ = ["GCRA_SCRIPT", "RateLimitFilter"]

log = logging.getLogger("meshgate.gateway.ratelimit")

GCRA_SCRIPT = b"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local emission = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if now < tat - tolerance then
  return {0, 0, tat - tolerance - now, tat - now}
end
local new_tat = tat + emission
-- %.0f: a plain integer (tostring would write 1.79e+15 and lose the microseconds)
local ttl = math.ceil((new_tat - now) / 1000) + 1
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl)
return {1, math.floor((now + tolerance + emission - new_tat) / emission), 0, new_tat - now}
"""
"""Returns {allowed, remaining, retry after (us), until the bucket is full (us)}."""

_SCRIPT_SHA = hashlib.sha1(GCRA_SCRIPT).hexdigest().encode()  # noqa: S324 - Redis's script id
_CLIENTS: dict[str, RespClient] = {}  # one pipelined connection per worker and URL
_MAX_LOCAL_KEYS = 100_000


def _client(url: str) -> RespClient:
    client = _CLIENTS.get(url)
    if client is None:
        client = _CLIENTS[url] = RespClient(url)
    return client


class _Buckets:
    """One route's local state: key -> TAT (monotonic seconds)."""

    __slots__ = ("__weakref__", "tat")

    def __init__(self) -> None:
        self.tat: dict[bytes, float] = {}


_LOCAL: weakref.WeakValueDictionary[tuple[str, RateLimitSettings], _Buckets] = (
    weakref.WeakValueDictionary()
)
"""Local state by route name and settings, so that a reload that changes neither
carries the counts on (the new runtime is built while the old one is alive). An
entry goes when the last filter using it does: nothing else needs pruning."""


def _buckets(route: str, settings: RateLimitSettings) -> _Buckets:
    key = (route, settings)
    buckets = _LOCAL.get(key)
    if buckets is None:
        buckets = _LOCAL[key] = _Buckets()
    return buckets


class RateLimitFilter:
    """A route's rate limit."""

    name = "rate_limit"

    def __init__(self, settings: RateLimitSettings, ctx: BuildContext) -> None:
        self.settings = settings
        route = ctx.route
        self._route = route.encode()
        self._trusted = ctx.trusted_proxies
        self._emission = 1.0 / settings.rate
        self._tolerance = settings.burst * self._emission
        by = settings.by
        self._by = by
        self._header = by[7:].lower().encode() if by.startswith("header:") else None
        capacity = settings.burst + 1
        window = max(1, math.ceil(capacity / settings.rate))
        self._policy = b'RateLimit-Policy: "meshgate";q=%d;w=%d\r\n' % (capacity, window)
        self.redis_errors = 0
        """Redis failures of this filter (the metric also counts those before a reload)."""
        self._last_warning = 0.0
        if settings.redis is None:
            # Held here: the registry only keeps what some filter holds.
            self._buckets = _buckets(route, settings)
            self._tat = self._buckets.tat
        else:
            self._key_prefix = f"{{{settings.key_prefix}:rl:{route}:".encode()
            emission_us = str(max(1, round(self._emission * 1_000_000))).encode()
            tolerance_us = str(round(self._tolerance * 1_000_000)).encode()
            # The command, pre-encoded around the one part that varies: the key.
            args = b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in (emission_us, tolerance_us))
            self._evalsha = b"*6\r\n$7\r\nEVALSHA\r\n$40\r\n" + _SCRIPT_SHA + b"\r\n$1\r\n1\r\n"
            self._eval = b"*6\r\n$4\r\nEVAL\r\n$%d\r\n%s\r\n$1\r\n1\r\n" % (
                len(GCRA_SCRIPT),
                GCRA_SCRIPT,
            )
            self._args_frame = args
            self._script_loaded = False
            try:
                self._client = _client(settings.redis)
            except (ValueError, OSError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise ConfigError(
                    [
                        ConfigIssue(
                            ctx.at("rate_limit.redis"),
                            f"the Redis URL's TLS settings are unusable: {reason}; "
                            "check the files its ssl_ca_certs, ssl_certfile and "
                            "ssl_keyfile name",
                        )
                    ]
                ) from None

    # -- keys

    def _key(self, exchange: FilterExchange) -> bytes:
        by = self._by
        if by == "route":
            return b""
        if by == "consumer" and exchange.consumer is not None:
            return b"c:" + exchange.consumer.encode()
        if self._header is not None:
            for name, value in exchange.headers:
                if name.lower() == self._header:
                    return b"h:" + hashlib.blake2s(value, digest_size=12).hexdigest().encode()
            return b"h:"  # requests without the header share one bucket
        return b"ip:" + client_address(exchange, self._trusted).encode()

    # -- the filter

    def request(self, exchange: FilterExchange) -> Verdict:
        key = self._key(exchange)
        if self.settings.redis is not None:
            return self._redis(exchange, key)
        now = time.monotonic()
        tats = self._tat
        tat = tats.get(key, now)
        if tat < now:
            tat = now
        if now < tat - self._tolerance:
            return self._refuse(exchange, tat - self._tolerance - now, tat - now)
        new_tat = tat + self._emission
        if len(tats) >= _MAX_LOCAL_KEYS:
            self._forget(now)
        tats[key] = new_tat
        # The epsilon absorbs float rounding (2.0 must not come out as 1.9999...).
        remaining = int((now + self._tolerance + self._emission - new_tat) / self._emission + 1e-9)
        self._headers(exchange, remaining, new_tat - now)
        return None

    def _forget(self, now: float) -> None:
        """Drop keys whose bucket is full again (they hold no information)."""
        for key in [k for k, tat in self._tat.items() if tat <= now]:
            del self._tat[key]
        if len(self._tat) >= _MAX_LOCAL_KEYS:
            self._tat.clear()

    def _redis(self, exchange: FilterExchange, key: bytes) -> Verdict:
        full = self._key_prefix + key + b"}"
        # EVAL until Redis has the script cached; then only its SHA1 goes over.
        head = self._evalsha if self._script_loaded else self._eval
        self._script_loaded = True
        frame = head + b"$%d\r\n%s\r\n" % (len(full), full) + self._args_frame
        return self._client.send(frame, partial(self._decide, exchange))

    def _decide(self, exchange: FilterExchange, result: object) -> bytes | None:
        """The verdict from Redis's reply (called as the reply is read).

        Raises:
            FollowUp: the script was unknown; the request went again with it.
        """
        if isinstance(result, RedisError):
            if str(result).startswith("NOSCRIPT"):
                raise FollowUp(self._send_script(exchange))
            return self._redis_failed(exchange, result)
        reply: list[int] = result  # type: ignore[assignment]
        allowed, remaining, retry_us, reset_us = reply
        if not allowed:
            return self._refuse(exchange, retry_us / 1_000_000, reset_us / 1_000_000)
        self._headers(exchange, remaining, reset_us / 1_000_000)
        return None

    def _send_script(self, exchange: FilterExchange) -> Pending:
        """Send ``exchange``'s request again with EVAL: Redis lost its script cache
        (a restart, SCRIPT FLUSH). The requests after it go on with EVALSHA: they
        reach Redis after the EVAL that caches the script again."""
        full = self._key_prefix + self._key(exchange) + b"}"
        frame = self._eval + b"$%d\r\n%s\r\n" % (len(full), full) + self._args_frame
        return self._client.send(frame, partial(self._decide_eval, exchange))

    def _decide_eval(self, exchange: FilterExchange, result: object) -> bytes | None:
        """The verdict from Redis's reply to that EVAL: no second fallback."""
        if isinstance(result, RedisError):
            return self._redis_failed(exchange, result)
        return self._decide(exchange, result)

    def _redis_failed(self, exchange: FilterExchange, exc: RedisError) -> bytes | None:
        self.redis_errors += 1
        exchange.route.stats.rate_limit_redis_errors += 1  # type: ignore[union-attr]
        now = time.monotonic()
        if now - self._last_warning > 10:
            self._last_warning = now
            log.warning(
                "rate limit on route %s: Redis unavailable (%s); failing %s (%d so far)",
                self._route.decode(),
                exc,
                self.settings.on_redis_error,
                self.redis_errors,
            )
        if self.settings.on_redis_error == "open":
            return None
        return reply(
            exchange,
            503,
            "rate_limiter_unavailable",
            "the rate limiter cannot decide right now; try again shortly",
            headers=b"Retry-After: 1\r\n",
        )

    def _headers(self, exchange: FilterExchange, remaining: int, reset: float) -> None:
        exchange.resp_extra += self._policy + b'RateLimit: "meshgate";r=%d;t=%d\r\n' % (
            max(remaining, 0),
            math.ceil(reset),
        )

    def _refuse(self, exchange: FilterExchange, retry_after: float, reset: float) -> bytes:
        exchange.route.stats.rate_limited += 1  # type: ignore[union-attr]
        wait = max(1, math.ceil(retry_after))
        return reply(
            exchange,
            429,
            "rate_limited",
            f"too many requests; retry in {wait}s",
            headers=self._policy
            + b'RateLimit: "meshgate";r=0;t=%d\r\nRetry-After: %d\r\n' % (math.ceil(reset), wait),
        )
