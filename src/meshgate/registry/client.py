"""A client of the registry's HTTP API, and a heartbeater that keeps an instance
registered for as long as its service runs.

``url`` is the base URL of the gateway's admin listener (``http://127.0.0.1:9901``);
the client adds ``/v1/registry/...``. Errors: :class:`RegistryUnavailableError` when
the registry cannot be reached or answers 5xx (retry later),
:class:`RegistryRequestError` when it refuses a request (4xx: a bad token, a bad
spec), :class:`RegistryClosedError` after :meth:`RegistryClient.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

from meshgate.registry.api import PREFIX
from meshgate.registry.errors import (
    RegistryClosedError,
    RegistryError,
    RegistryRequestError,
    RegistryUnavailableError,
)
from meshgate.registry.model import Instance, InstanceSpec, Snapshot, check_name
from meshgate.registry.store import backoff, cancel_task

__all__ = ["Heartbeater", "RegistryClient"]

log = logging.getLogger("meshgate.registry")

T = TypeVar("T")

_STATUS_ERRORS = {401: "unauthorized", 403: "forbidden", 404: "not_found"}


class RegistryClient:
    """Talks to the registry API at ``url`` (the admin listener's base URL) with the
    bearer ``token``.

    ``timeout`` (seconds) bounds each request (a long poll waits ``watch_wait``
    longer). ``transport`` replaces the network (tests use ``httpx.ASGITransport``).
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 5.0,
        watch_wait: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(
                f"registry URL {url!r}: give the gateway admin listener's base URL, "
                "such as http://127.0.0.1:9901"
            )
        if timeout <= 0 or watch_wait <= 0:
            raise ValueError(
                f"timeout={timeout!r}, watch_wait={watch_wait!r}: give positive seconds"
            )
        self.url = url.rstrip("/")
        """The registry's base URL."""
        self.timeout = timeout
        self.watch_wait = watch_wait
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.AsyncClient(
            base_url=self.url + PREFIX,
            headers=headers,
            timeout=timeout,
            transport=transport,
            follow_redirects=False,
        )
        self._closed = asyncio.Event()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed.is_set()

    async def register(self, service: str, instance_id: str, spec: InstanceSpec) -> Instance:
        """Register (or refresh) ``instance_id`` of ``service`` with ``spec``."""
        path = _instance_path(service, instance_id)
        response = await self._request("PUT", path, json=spec.model_dump(mode="json"))
        if response.status_code != 200:
            raise _refused(response)
        return Instance.model_validate(response.json())

    async def heartbeat(self, service: str, instance_id: str) -> Instance | None:
        """Extend the instance's TTL; None if the registry does not know it (register
        it again)."""
        response = await self._request("PUT", _instance_path(service, instance_id) + "/heartbeat")
        if _is_not_registered(response):
            return None
        if response.status_code != 200:
            raise _refused(response)
        return Instance.model_validate(response.json())

    async def deregister(self, service: str, instance_id: str) -> bool:
        """Remove the instance; False if it was not registered."""
        response = await self._request("DELETE", _instance_path(service, instance_id))
        if _is_not_registered(response):
            return False
        if response.status_code not in (200, 204):
            raise _refused(response)
        return True

    async def snapshot(self, service: str | None = None) -> Snapshot:
        """The current instances of ``service`` (or of every service)."""
        return await self._read(service, None)

    async def wait(self, index: int, service: str | None = None, wait: float = 30.0) -> Snapshot:
        """A long poll: the snapshot as soon as its index passes ``index``, or the
        current one after ``wait`` seconds (the server caps it at 5 minutes)."""
        return await self._read(service, index, wait)

    async def watch(self, service: str | None = None) -> AsyncIterator[Snapshot]:
        """The current snapshot of ``service`` (or of all), then every new state.

        Long-polls by index, so no change is skipped: a state that changed twice
        between two polls comes once, as its latest. Rides out an unreachable
        registry (retrying with backoff, from the last index seen); a registry that
        restarted with a lower index (without persistence) is followed from there.
        Raises :class:`RegistryRequestError` if the registry refuses the watch (a bad
        token); ends when the client is closed.
        """
        if service is not None:
            check_name(service, "service")
        index: int | None = None
        failures = 0
        while True:
            try:
                snapshot = await self._until_closed(
                    self._read(service, index, self.watch_wait if index is not None else None)
                )
            except RegistryClosedError:
                return
            except RegistryUnavailableError as exc:
                if failures == 0:
                    log.warning("registry watch of %s: %s; retrying", service or "*", exc)
                failures += 1
                if not await self._pause(backoff(failures)):
                    return
                continue
            if snapshot is None:
                return
            if failures:
                log.info("registry watch of %s: the registry is reachable again", service or "*")
                failures = 0
            if snapshot.index != index:
                index = snapshot.index
                yield snapshot

    async def close(self) -> None:
        """Close the connections; watches end. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- internals

    async def _read(
        self, service: str | None, index: int | None, wait: float | None = None
    ) -> Snapshot:
        path = "/services" if service is None else f"/services/{check_name(service, 'service')}"
        params: dict[str, str] = {}
        timeout = self.timeout
        if index is not None:
            wait = 30.0 if wait is None else wait
            params = {"index": str(index), "wait": f"{wait:g}s"}
            timeout += wait
        response = await self._request("GET", path, params=params, timeout=timeout)
        if response.status_code != 200:
            raise _refused(response)
        return Snapshot.from_json(response.json())

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        if self.closed:
            raise RegistryClosedError("the registry client is closed")
        try:
            response = await self._http.request(
                method,
                path,
                json=json,
                params=params,
                timeout=self.timeout if timeout is None else timeout,
            )
        except httpx.HTTPError as exc:
            if self.closed:
                raise RegistryClosedError("the registry client is closed") from exc
            raise RegistryUnavailableError(
                f"the registry at {self.url} cannot be reached ({type(exc).__name__}: "
                f"{str(exc) or 'no detail'}); check that the gateway runs with "
                "gateway.registry.enabled and that the URL is its admin listener"
            ) from exc
        except RuntimeError as exc:  # httpx: "the client has been closed"
            if self.closed:
                raise RegistryClosedError("the registry client is closed") from exc
            raise
        if response.status_code >= 500:
            refused = _refused(response)
            raise RegistryUnavailableError(
                f"the registry at {self.url} answered {response.status_code} "
                f"{refused.error}: {refused.detail}"
            )
        return response

    async def _until_closed(self, work: Coroutine[Any, Any, T]) -> T | None:
        """``work``'s result, or None if the client is closed first."""
        task = asyncio.ensure_future(work)
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait((task, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pending in (closed, task):
                if not pending.done():
                    pending.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await pending
        if task.cancelled():
            return None
        return task.result()

    async def _pause(self, seconds: float) -> bool:
        """Sleep ``seconds``; False if the client was closed meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), seconds)
        return not self.closed


class Heartbeater:
    """Keeps ``instance_id`` of ``service`` registered with ``spec`` through
    ``client``: registers at :meth:`start`, heartbeats every ``interval`` seconds
    (default ``spec.ttl / 3``, so that one lost heartbeat does not evict it),
    registers again when the registry forgot the instance (a restart, a lapsed
    TTL), and deregisters at :meth:`stop`.
    """

    def __init__(
        self,
        client: RegistryClient,
        service: str,
        instance_id: str,
        spec: InstanceSpec,
        *,
        interval: float | None = None,
    ) -> None:
        check_name(service, "service")
        check_name(instance_id, "instance id")
        self.client = client
        self.service = service
        self.instance_id = instance_id
        self.spec = spec
        self.interval = spec.ttl / 3 if interval is None else interval
        if not 0 < self.interval < spec.ttl:
            raise ValueError(
                f"interval={self.interval!r}: heartbeat more often than the TTL "
                f"({spec.ttl:g}s), such as every ttl/3"
            )
        self.instance: Instance | None = None
        """The instance as the registry last answered, None before it registered."""
        self.registrations = 0
        """How many times the instance was registered (more than 1: the registry forgot it)."""
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._first = asyncio.Event()

    @property
    def registered(self) -> bool:
        """Whether the last answer of the registry had the instance registered."""
        return self.instance is not None

    async def wait_registered(self) -> None:
        """Return once the registry has confirmed a registration (at :meth:`start`, or
        later in the background when it could not be reached then)."""
        await self._first.wait()

    async def start(self) -> None:
        """Register, then heartbeat in the background.

        Returns after the first attempt: if the registry cannot be reached, it keeps
        trying in the background (with backoff). Raises
        :class:`RegistryRequestError` if the registry refuses the registration (a bad
        token or spec: retrying would not help).
        """
        if self._started:
            return
        self._started = True
        try:
            await self._register()
        except RegistryUnavailableError as exc:
            log.warning(
                "cannot register %s/%s yet: %s; retrying in the background",
                self.service,
                self.instance_id,
                exc,
            )
        except BaseException:
            self._started = False
            raise
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"meshgate-heartbeat-{self.service}/{self.instance_id}"
        )

    async def stop(self, timeout: float = 2.0) -> bool:
        """Stop heartbeating and deregister, giving up after ``timeout`` seconds
        (the TTL then evicts the instance). True if the registry confirmed it is gone."""
        if not self._started:
            return False
        self._started = False
        await cancel_task(self._task)
        self._task = None
        self.instance = None
        try:
            async with asyncio.timeout(timeout):
                await self.client.deregister(self.service, self.instance_id)
        except (RegistryError, TimeoutError) as exc:
            log.warning(
                "could not deregister %s/%s (%s); the registry evicts it when its TTL lapses",
                self.service,
                self.instance_id,
                str(exc) or "timed out",
            )
            return False
        return True

    async def _register(self) -> None:
        self.instance = await self.client.register(self.service, self.instance_id, self.spec)
        self.registrations += 1
        self._first.set()

    async def _run(self) -> None:
        failures = 0 if self.registered else 1
        while True:
            if failures:
                # Retry soon, but never later than the next heartbeat would be due.
                await asyncio.sleep(min(backoff(failures), self.interval))
            else:
                await asyncio.sleep(self.interval)
            try:
                if self.registered:
                    instance = await self.client.heartbeat(self.service, self.instance_id)
                    if instance is None:
                        log.info(
                            "registry forgot %s/%s; registering again",
                            self.service,
                            self.instance_id,
                        )
                    self.instance = instance
                if not self.registered:
                    await self._register()
            except RegistryClosedError:
                return
            except RegistryError as exc:
                # A refusal (a rotated token) is worth retrying too: the instance is
                # only useful registered, and the log says what is wrong.
                if failures == 0:
                    log.warning(
                        "heartbeat of %s/%s failed: %s; retrying",
                        self.service,
                        self.instance_id,
                        exc,
                    )
                failures += 1
            else:
                if failures:
                    log.info("%s/%s is registered again", self.service, self.instance_id)
                failures = 0


def _instance_path(service: str, instance_id: str) -> str:
    return (
        f"/services/{check_name(service, 'service')}"
        f"/instances/{check_name(instance_id, 'instance id')}"
    )


def _body(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _is_not_registered(response: httpx.Response) -> bool:
    # Only the registry's own answer: a 404 from a wrong URL is an error, not a cue
    # to register again forever.
    return response.status_code == 404 and _body(response).get("error") == "not_registered"


def _refused(response: httpx.Response) -> RegistryRequestError:
    body = _body(response)
    status = response.status_code
    error = str(body.get("error") or _STATUS_ERRORS.get(status, f"http_{status}"))
    detail = body.get("detail")
    if detail is None:
        detail = response.text[:500] or response.reason_phrase
    return RegistryRequestError(status, error, str(detail))
