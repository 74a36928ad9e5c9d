"""Sagas declared in Python: ordered steps, each an action and its compensation.

::

    place_order = Saga("place-order", timeout=60)

    @place_order.step("reserve-stock", timeout=5)
    async def reserve(ctx: StepContext) -> dict[str, Any]:
        answer = await inventory.post("/reservations", json=ctx.input,
                                      headers={"Idempotency-Key": ctx.idempotency_key})
        if answer.status_code == 409:
            raise StepFailed("out of stock")          # no effect: nothing to undo
        answer.raise_for_status()                     # anything else: retried, then undone
        return answer.json()                          # kept as ctx.results["reserve-stock"]

    @reserve.compensate
    async def release(ctx: StepContext) -> None: ...

    @place_order.on_completed
    async def completed(ctx: StepContext, session: AsyncSession) -> None: ...

    service.events.saga(place_order)                  # this service drives it
    await place_order.start(session, {"order_id": 7}) # in the caller's transaction

An action returns what later steps need (JSON values); it raises
:class:`~meshgate.events.errors.StepFailed` when it failed for good without effect,
and anything else (a timeout too) when the outcome is unknown: that is retried
with the same idempotency key, so the callee can apply it once, and after the last
attempt the saga compensates that step too. Compensations must be idempotent and
must accept "nothing to undo". See :mod:`meshgate.events.sagas` for how they are
driven, and docs/events.md.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from meshgate.errors import ConfigError, ConfigIssue
from meshgate.events.errors import SagaError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from meshgate.events.sagas import SagaRunner

__all__ = ["Saga", "Step", "StepContext"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")

Action = Callable[["StepContext"], Awaitable[Any]]
Finisher = Callable[["StepContext", "AsyncSession"], Awaitable[None]]


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(
            [
                ConfigIssue(
                    what,
                    f"{name!r} is not a {what} name; use letters, digits, '.', '_' and '-' "
                    "(up to 100), such as reserve-stock",
                )
            ]
        )
    return name


@dataclass(frozen=True, slots=True)
class StepContext:
    """What a step's action or compensation (or a saga's ending) gets."""

    saga_id: str
    """The saga's id."""
    saga: str
    """The saga's name."""
    step: str
    """The step running ('' for an ending)."""
    phase: str
    """``action``, ``compensation`` or ``end``."""
    attempt: int
    """Which attempt of this step and phase this is, counting those of earlier
    instances too (1 the first time)."""
    input: Any
    """What the saga was started with."""
    results: dict[str, Any]
    """The results of the steps done so far, by step name."""
    error: str | None = None
    """Why the saga is compensating (for compensations and ``on_compensated``)."""
    deadline: datetime | None = None
    """When the whole saga times out (UTC)."""

    @property
    def action_key(self) -> str:
        """The idempotency key of this step's action, also in its compensation: what
        names the thing to undo at the callee."""
        return f"{self.saga_id}:{self.step}"

    @property
    def idempotency_key(self) -> str:
        """The same for every attempt of this step and phase, in any instance: give it
        to the callee (``Idempotency-Key``) so that a retry is not applied twice."""
        suffix = "" if self.phase == "action" else f":{self.phase}"
        return f"{self.saga_id}:{self.step}{suffix}"


@dataclass(slots=True)
class Step:
    """One step: an action, and the compensation that undoes it."""

    name: str
    action: Action
    timeout: float = 10.0
    """Seconds one attempt may take; past it, the attempt counts as failed (unknown
    outcome)."""
    attempts: int = 3
    """Attempts of the action before the saga compensates."""
    compensation: Action | None = None
    compensation_attempts: int = 10
    """Attempts of the compensation before the saga is left ``stuck``."""
    retry_delay: float = 0.2
    """Seconds before the second attempt; doubled each time (at most 5 s)."""

    def compensate(self, func: Action) -> Action:
        """Declare the compensation (a decorator)."""
        self.compensation = func
        return func

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt``."""
        return float(min(self.retry_delay * 2 ** (attempt - 1), 5.0))


@dataclass(slots=True)
class Saga:
    """An orchestrated saga: its ordered steps and what happens when it ends."""

    name: str
    timeout: float = 300.0
    """Seconds from the start within which the forward steps must be done; past it
    the saga compensates."""
    steps: list[Step] = field(default_factory=list)
    completed: Finisher | None = None
    compensated: Finisher | None = None
    runner: SagaRunner | None = None
    """Set when a service drives it (``service.events.saga(...)``)."""

    def __post_init__(self) -> None:
        _check_name(self.name, "saga")
        if not self.timeout > 0:
            raise ConfigError(
                [ConfigIssue("timeout", f"got {self.timeout!r}; expected seconds above 0")]
            )

    def step(
        self,
        name: str,
        *,
        timeout: float = 10.0,
        attempts: int = 3,
        compensation_attempts: int = 10,
        retry_delay: float = 0.2,
    ) -> Callable[[Action], Step]:
        """Add a step (a decorator of its action; returns the :class:`Step`, whose
        ``compensate`` decorates the compensation)."""
        _check_name(name, "step")
        if any(s.name == name for s in self.steps):
            raise ConfigError(
                [
                    ConfigIssue(
                        f"{self.name}.{name}", f"saga {self.name!r} has a step {name!r} already"
                    )
                ]
            )
        for field_name, value, low in (
            ("attempts", attempts, 1),
            ("compensation_attempts", compensation_attempts, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ConfigError(
                    [
                        ConfigIssue(
                            f"{self.name}.{name}.{field_name}", f"got {value!r}; expected 1 or more"
                        )
                    ]
                )
        if not timeout > 0:
            raise ConfigError(
                [
                    ConfigIssue(
                        f"{self.name}.{name}.timeout", f"got {timeout!r}; expected seconds above 0"
                    )
                ]
            )

        def register(action: Action) -> Step:
            step = Step(
                name,
                action,
                timeout=timeout,
                attempts=attempts,
                compensation_attempts=compensation_attempts,
                retry_delay=retry_delay,
            )
            self.steps.append(step)
            return step

        return register

    def on_completed(self, func: Finisher) -> Finisher:
        """Run ``func(ctx, session)`` in the transaction that marks the saga completed
        (update your own rows, publish an event: all or nothing)."""
        self.completed = func
        return func

    def on_compensated(self, func: Finisher) -> Finisher:
        """Run ``func(ctx, session)`` in the transaction that marks the saga compensated
        (``ctx.error`` says why it was)."""
        self.compensated = func
        return func

    async def start(
        self, session: AsyncSession, data: Any = None, *, saga_id: str | None = None
    ) -> str:
        """Start the saga in the transaction of ``session`` (it runs once that commits,
        and never if it rolls back); returns its id.

        ``saga_id`` makes the start idempotent: a second start with the same id is
        refused by the database (an IntegrityError at commit).

        Raises:
            SagaError: no service drives this saga (``service.events.saga(...)``).
            EnvelopeError: ``data`` (what steps get as ``ctx.input``) is not JSON.
        """
        if self.runner is None:
            raise SagaError(
                f"saga {self.name!r} is not driven by any service here: register it with "
                "service.events.saga(...) first"
            )
        return await self.runner.start(session, self, data, saga_id=saga_id)
