"""``ServiceClient``: calls from one service to another, done properly.

``service.client("users")`` finds the instances of ``users`` in the registry (and
keeps the list current by watching it), and for each call:

- picks an instance by least request (power of two choices over in-flight requests
  and a latency average), skipping instances that keep failing (ejected for a
  while, never all of them);
- bounds the call by its timeout and by the deadline of the request being handled,
  and tells the callee how long the caller will wait (``X-Meshgate-Deadline-Ms``);
- retries, on another instance, what is safe to retry: a connection that never
  reached the callee, or an idempotent request (GET, HEAD, OPTIONS, PUT, DELETE, or
  any with an ``Idempotency-Key``) that failed or got 502/503/504; within a retry
  budget (20 % of calls plus a few a second), so that a failing service is not
  flooded;
- fails fast while the service's circuit breaker is open;
- carries the request id, the W3C trace context, and a signed token naming the
  calling service (see :mod:`meshgate.service.identity`);
- is one CLIENT span (``GET users``) in the request's trace, the parent of what the
  callee records for every try: with the instance that answered
  (``server.address``, ``server.port``, ``meshgate.instance``), the status, the
  retries (``meshgate.retries``, ``http.request.resend_count``, and an event per
  failed try naming its instance and why), and the breaker's state
  (``meshgate.breaker.state``);
- is counted: ``meshgate_client_requests_total{service,target,code}`` (``code`` is
  the answer's status, or ``unavailable`` or ``timeout`` when none came),
  ``meshgate_client_retries_total``, and, read when scraped,
  ``meshgate_client_breaker_open`` and ``meshgate_client_retry_budget_tokens``.

The balancing, outlier ejection, retry budget and breaker are the gateway's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import random
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import httpx
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import CollectorRegistry

from meshgate.config.model import (
    Address,
    CircuitBreakerSettings,
    PassiveHealthSettings,
    RetryBudgetSettings,
    UpstreamSettings,
)
from meshgate.gateway.upstream.balancer import LeastRequest
from meshgate.gateway.upstream.health import CircuitBreaker, OutlierDetector, RetryBudget
from meshgate.gateway.upstream.pool import Endpoint, record_failure, record_success
from meshgate.service._metrics import client_metrics
from meshgate.service.context import (
    DEADLINE_HEADER,
    current_deadline,
    current_request_id,
)
from meshgate.service.errors import (
    DeadlineExceededError,
    NoRegistryError,
    ServiceUnavailableError,
)
from meshgate.service.identity import IDENTITY_HEADER, IdentitySigner
from meshgate.service.telemetry import quiet_http

if TYPE_CHECKING:
    from meshgate.service.telemetry import Telemetry

# The errors live in meshgate.service.errors; importing them from here keeps working.
__all__ = ["DeadlineExceededError", "ServiceClient", "ServiceUnavailableError"]

log = logging.getLogger("meshgate.service.client")

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_RETRY_STATUSES = frozenset({502, 503, 504})
_TRACER = trace.get_tracer("meshgate.service.client")
"""The process's tracer, for a client that no service made."""


class _Call:
    """What one call did, for its span and its count."""

    __slots__ = ("code", "instance", "retries")

    def __init__(self) -> None:
        self.code = "unavailable"
        self.instance: Endpoint | None = None
        self.retries = 0


class ServiceClient:
    """Calls one service; see the module documentation."""

    def __init__(
        self,
        service: str,
        *,
        registry: str | None = None,
        registry_token: str | None = None,
        endpoints: Sequence[str] | None = None,
        caller: str | None = None,
        secret: str | None = None,
        timeout: float = 5.0,
        retries: int = 2,
        retry_budget: float = 0.2,
        retries_per_second: float = 5.0,
        consecutive_failures: int = 3,
        ejection: float = 5.0,
        circuit_breaker: CircuitBreakerSettings | None = None,
        discovery_timeout: float = 5.0,
        max_connections: int = 100,
        telemetry: Telemetry | None = None,
        metrics: CollectorRegistry | None = None,
    ) -> None:
        """Nothing is looked up until the first call, so that a client may be made when
        a module is imported (``users = service.client("users")``) by a process that
        never calls it (``meshgate db upgrade``).

        Args:
            service: the service to call.
            registry: the registry URL to discover it in; None: ``MESHGATE_REGISTRY_URL``
                as it is at the first call (unless ``endpoints`` are given).
            registry_token: the registry's bearer token (``MESHGATE_REGISTRY_TOKEN``).
            endpoints: fixed ``host:port`` addresses instead of the registry.
            caller: the calling service's name (for the identity token).
            secret: the shared secret that signs identity tokens; none: no token.
            timeout: the default timeout of a call, all tries included.
            retries: tries after the first, at most.
            retry_budget: retries allowed per call made (0.2: 20 %).
            retries_per_second: retries always allowed per second.
            consecutive_failures: failures in a row that eject an instance.
            ejection: the first ejection's length; each repeat doubles it.
            circuit_breaker: the service's breaker (default: opens at 50 % failures
                of at least 20 calls in 10 s, for 10 s).
            discovery_timeout: how long a first call waits for the registry.
            max_connections: pooled connections to the service, at most.
            telemetry: the calling service's traces (``Service.client`` gives it);
                None: the process's tracer provider.
            metrics: the Prometheus registry of its metrics; None: the process's,
                which every service's ``/metrics`` shows (one family for all the
                clients of the process, each labelled with its caller).
        """
        self.service = service
        self.caller = caller or ""
        """The calling service (the ``service`` label of the metrics)."""
        self.timeout = timeout
        self.retries = retries
        self.discovery_timeout = discovery_timeout
        self._settings = UpstreamSettings(
            service=service,
            health={
                "passive": PassiveHealthSettings(
                    consecutive_failures=consecutive_failures,
                    base_ejection=ejection,
                    max_ejection=max(60.0, ejection),
                )
            },
        )
        self._balancer = LeastRequest(self._settings, ())
        self._budget = RetryBudget(
            RetryBudgetSettings(ratio=retry_budget, min_per_second=retries_per_second)
        )
        self._budget_tick = time.monotonic()
        self._calls = 0
        self.breaker = CircuitBreaker(circuit_breaker or CircuitBreakerSettings())
        self._signer = (
            IdentitySigner(caller, secret) if caller is not None and secret is not None else None
        )
        self._http = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=32),
            timeout=timeout,
            follow_redirects=False,
        )
        self.instances: tuple[Endpoint, ...] = ()
        self._outlier: OutlierDetector | None = None
        self._known = asyncio.Event()
        self._registry_url = registry
        self._registry_token = registry_token
        self._fixed = endpoints is not None
        self._watcher: asyncio.Task[None] | None = None
        self._registry_client: Any = None
        self.retried = 0  # retries made, for tests and metrics
        self._telemetry = telemetry
        counters = client_metrics(metrics)
        self._requests = counters.requests
        self._counted: dict[str, Any] = {}
        self._retries = counters.retries.labels(self.caller, service)
        counters.live.clients.add(self)
        if endpoints is not None:
            self.set_instances(endpoints)

    # -- instances

    def set_instances(self, addresses: Sequence[str]) -> None:
        """Call these ``host:port`` addresses from now on (what the registry watch
        does); instances that stay keep their load, latency and health."""
        current = {e.label: e for e in self.instances}
        instances = []
        for text in addresses:
            address = Address.model_validate(text)
            endpoint = current.get(str(address)) or Endpoint(address.host, address.port)
            instances.append(endpoint)
        self.instances = tuple(instances)
        self._outlier = (
            OutlierDetector(self._settings.health.passive, self.instances, lambda: None)  # type: ignore[arg-type]
            if len(self.instances) > 1
            else None
        )
        self._known.set()

    def use_endpoints(self, addresses: Sequence[str]) -> None:
        """Call these fixed ``host:port`` addresses from now on, and stop following the
        registry (tests, a service outside the registry)."""
        self._fixed = True
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        self.set_instances(addresses)

    def _registry(self) -> tuple[str, str | None]:
        """The registry to discover the service in, resolved at the first call."""
        url = self._registry_url or os.environ.get("MESHGATE_REGISTRY_URL") or None
        if url is None:
            raise NoRegistryError(
                f"cannot call {self.service!r}: no registry to find it in; set "
                "MESHGATE_REGISTRY_URL (meshgate up and meshgate serve under it set it), or "
                "give the client fixed endpoints (ServiceClient(..., endpoints=[...]), or "
                "meshgate.service.testing.use_endpoints in tests)"
            )
        self._registry_url = url
        token = self._registry_token or os.environ.get("MESHGATE_REGISTRY_TOKEN") or None
        self._registry_token = token
        return url, token

    async def _watch(self, url: str, token: str | None) -> None:
        from meshgate.registry.client import RegistryClient  # noqa: PLC0415

        client = RegistryClient(url, token)
        self._registry_client = client
        try:
            async for snapshot in client.watch(self.service):
                self.set_instances([instance.address for instance in snapshot.instances])
        finally:
            await client.close()

    async def _candidates(self, deadline: float) -> tuple[Endpoint, ...]:
        if not self._fixed and self._watcher is None:
            url, token = self._registry()
            # A context of its own: the first call's request (its id, its trace) is
            # not the watch's, which lasts as long as the client.
            self._watcher = asyncio.get_running_loop().create_task(
                self._watch(url, token), context=contextvars.Context()
            )
        if not self._known.is_set():
            wait = min(self.discovery_timeout, deadline - time.monotonic())
            try:
                async with asyncio.timeout(max(wait, 0.0)):
                    await self._known.wait()
            except TimeoutError:
                raise ServiceUnavailableError(
                    f"cannot find {self.service!r}: the registry at {self._registry_url} did "
                    f"not answer within {wait:.1f}s"
                ) from None
        now = time.monotonic()
        if self._outlier is not None:
            self._outlier.tick(now)
        return tuple(e for e in self.instances if e.available)

    # -- calls

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        idempotent: bool | None = None,
    ) -> httpx.Response:
        """Call ``method path`` on an instance; the response, whatever its status.

        Raises:
            ServiceUnavailableError: no instance could answer (see the class).
            DeadlineExceededError: the timeout or the request's deadline passed.
        """
        method = method.upper()
        tracer = self._telemetry.tracer if self._telemetry is not None else _TRACER
        span = tracer.start_span(f"{method} {self.service}", kind=SpanKind.CLIENT)
        call = _Call()
        failure: BaseException | None = None
        try:
            with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                response = await self._call(
                    call,
                    span,
                    method,
                    path,
                    params=params,
                    json=json,
                    content=content,
                    headers=headers,
                    timeout=timeout,
                    idempotent=idempotent,
                )
            call.code = str(response.status_code)
        except DeadlineExceededError as exc:
            call.code, failure = "timeout", exc
            raise
        except ServiceUnavailableError as exc:
            failure = exc
            raise
        except BaseException as exc:
            # Cancelled with the request, or a bug: not an outcome of the callee's.
            call.code, failure = "", exc
            raise
        else:
            return response
        finally:
            if call.code:
                counted = self._counted.get(call.code)
                if counted is None:
                    counted = self._counted[call.code] = self._requests.labels(
                        self.caller, self.service, call.code
                    )
                counted.inc()
            if span.is_recording():
                self._describe(span, method, path, call, failure)
            span.end()

    def _describe(
        self,
        span: trace.Span,
        method: str,
        path: str,
        call: _Call,
        failure: BaseException | None,
    ) -> None:
        """The attributes and status of a call's span, once it ended."""
        instance = call.instance
        attributes: dict[str, str | int] = {
            "http.request.method": method,
            "peer.service": self.service,
            "meshgate.retries": call.retries,
            "meshgate.breaker.state": self.breaker.state,
        }
        if instance is not None:
            attributes["server.address"] = instance.host
            attributes["server.port"] = instance.port
            attributes["meshgate.instance"] = instance.label
            attributes["url.full"] = f"http://{instance.label}{path}"
        if call.retries:
            attributes["http.request.resend_count"] = call.retries
        status = int(call.code) if call.code.isdigit() else 0
        if status:
            attributes["http.response.status_code"] = status
        if failure is not None:
            attributes["error.type"] = type(failure).__qualname__
            span.set_status(Status(StatusCode.ERROR, str(failure)))
        elif status >= 500:
            attributes["error.type"] = call.code
            span.set_status(Status(StatusCode.ERROR))
        span.set_attributes(attributes)

    async def _call(
        self,
        call: _Call,
        span: trace.Span,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None,
        json: Any,
        content: bytes | None,
        headers: Mapping[str, str] | None,
        timeout: float | None,
        idempotent: bool | None,
    ) -> httpx.Response:
        started = time.monotonic()
        deadline = started + (timeout if timeout is not None else self.timeout)
        inherited = current_deadline.get()
        if inherited is not None and inherited < deadline:
            deadline = inherited
        if deadline <= started:
            raise DeadlineExceededError(
                f"no time left to call {self.service!r}: the request's deadline has passed"
            )
        out = dict(headers or {})
        if idempotent is None:
            idempotent = method in _IDEMPOTENT or any(k.lower() == "idempotency-key" for k in out)
        request_id = current_request_id.get() or os.urandom(16).hex()
        out.setdefault("X-Request-ID", request_id)
        # The call's span (current here) is the parent of what the callee records,
        # whichever try reaches it.
        propagate.inject(out)
        if self._signer is not None:
            out[IDENTITY_HEADER] = self._signer.token(self.service)
        if not self.breaker.allow(started):
            raise ServiceUnavailableError(
                f"{self.service!r} is failing; its circuit breaker is open for another "
                f"{self.breaker.retry_after(started)}s"
            )
        self._spend_credit()
        recording = span.is_recording()
        tried: list[Endpoint] = []
        failures: list[str] = []
        answer: httpx.Response | None = None  # the last try's 5xx, returned if it is the last
        attempt = 0
        while True:
            candidates = await self._candidates(deadline)
            if not candidates:
                if not self.instances:
                    raise ServiceUnavailableError(f"no instance of {self.service!r} is registered")
                raise ServiceUnavailableError(
                    f"no instance of {self.service!r} is available (all ejected or draining)"
                )
            fresh = tuple(e for e in candidates if e not in tried) or candidates
            instance = self._balancer.pick(None, fresh)  # type: ignore[arg-type]
            assert instance is not None  # noqa: S101 - fresh is never empty
            tried.append(instance)
            call.instance = instance
            left = deadline - time.monotonic()
            if left <= 0:
                detail = "; ".join(failures) or "no try finished"
                raise DeadlineExceededError(f"{self.service!r} did not answer in time: {detail}")
            out[DEADLINE_HEADER] = str(int(left * 1000))
            url = f"http://{instance.label}{path}"
            instance.inflight += 1
            sent = time.monotonic()
            retriable = False
            if answer is not None:
                await answer.aclose()
                answer = None
            try:
                with quiet_http():
                    response = await self._http.request(
                        method,
                        url,
                        params=params,
                        json=json,
                        content=content,
                        headers=out,
                        timeout=httpx.Timeout(left, connect=min(left, 2.0)),
                    )
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                retriable = True  # it never reached the callee: safe for any method
                failures.append(f"{instance.label}: cannot connect ({exc or type(exc).__name__})")
            except httpx.TimeoutException:
                retriable = idempotent
                failures.append(f"{instance.label}: no answer within {left:.2f}s")
            except httpx.TransportError as exc:
                retriable = idempotent
                failures.append(f"{instance.label}: {type(exc).__name__} ({exc})")
            else:
                elapsed = time.monotonic() - sent
                if response.status_code < 500:
                    record_success(instance, elapsed, self.breaker, time.monotonic())
                    return response
                retriable = idempotent and response.status_code in _RETRY_STATUSES
                failures.append(f"{instance.label}: status {response.status_code}")
                answer = response
            finally:
                instance.inflight -= 1
            # A failure: health, breaker, then perhaps another try elsewhere.
            now = time.monotonic()
            record_failure(instance, now, self._outlier, self.breaker)
            if recording:
                span.add_event(
                    "try failed",
                    {"meshgate.instance": instance.label, "meshgate.reason": failures[-1]},
                )
            if not retriable or attempt >= self.retries or not self._budget.try_spend():
                break
            attempt += 1
            call.retries = attempt
            self.retried += 1
            self._retries.inc()
            backoff = min(0.025 * 2 ** (attempt - 1), 0.25) * (0.5 + random.random())  # noqa: S311
            if time.monotonic() + backoff >= deadline:
                break
            await asyncio.sleep(backoff)
        if answer is not None:
            return answer  # the callee's own 5xx, for the caller to read
        if time.monotonic() >= deadline:
            raise DeadlineExceededError(
                f"{self.service!r} did not answer in time: " + "; ".join(failures)
            )
        raise ServiceUnavailableError(
            f"{self.service!r} could not be reached: " + "; ".join(failures)
        )

    # -- what the metrics read

    def breaker_open(self, now: float) -> bool:
        """Whether the circuit breaker refuses calls at ``now`` (monotonic)."""
        breaker = self.breaker
        return (
            breaker.state == CircuitBreaker.OPEN
            and now - breaker.opened_at < breaker.settings.open_for
        )

    def retry_tokens(self) -> float:
        """Retries the budget allows now (as credited by the last call)."""
        return float(self._budget.tokens)

    def _spend_credit(self) -> None:
        """Credit the retry budget for this call (lazily, by elapsed time)."""
        now = time.monotonic()
        self._calls += 1
        elapsed = now - self._budget_tick
        if elapsed >= 0.1:
            self._budget.tick(elapsed, self._calls)
            self._budget_tick = now
            self._calls = 0

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        """``request("GET", path, ...)``."""
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> httpx.Response:
        """``request("POST", path, ...)``."""
        return await self.request("POST", path, **kwargs)

    async def put(self, path: str, **kwargs: Any) -> httpx.Response:
        """``request("PUT", path, ...)``."""
        return await self.request("PUT", path, **kwargs)

    async def patch(self, path: str, **kwargs: Any) -> httpx.Response:
        """``request("PATCH", path, ...)``."""
        return await self.request("PATCH", path, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        """``request("DELETE", path, ...)``."""
        return await self.request("DELETE", path, **kwargs)

    async def close(self) -> None:
        """Stop watching the registry and close pooled connections."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
            self._watcher = None
        await self._http.aclose()
