"""Health from live traffic: outlier detection, the circuit breaker, the retry budget.

Time is passed explicitly (``now``), as the worker's sweep does; nothing sleeps.
"""

from __future__ import annotations

import pytest

from meshgate.config import UpstreamSettings, loads
from meshgate.gateway.upstream.health import CircuitBreaker, OutlierDetector, RetryBudget
from meshgate.gateway.upstream.pool import Endpoint


def _upstream(extra: str) -> UpstreamSettings:
    """An upstream's settings validated as in production."""
    return loads(f"upstreams:\n  up: {{endpoints: ['127.0.0.1:1'], {extra}}}\n").upstreams["up"]


def _endpoints(count: int) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i}", 8080) for i in range(1, count + 1)]


# ---------------------------------------------------------------------------- outlier detection


class Detector:
    """An OutlierDetector over fresh endpoints, counting its ``changed`` calls."""

    def __init__(
        self,
        count: int = 3,
        *,
        failures: int = 3,
        base: str = "10s",
        most: str = "35s",
        percent: int = 100,
    ) -> None:
        passive = (
            f"{{consecutive_failures: {failures}, base_ejection: {base}, "
            f"max_ejection: {most}, max_ejected_percent: {percent}}}"
        )
        settings = _upstream(f"health: {{passive: {passive}}}").health.passive
        assert settings is not None
        self.endpoints = _endpoints(count)
        self.changes = 0
        self.detector = OutlierDetector(settings, self.endpoints, self._changed)

    def _changed(self) -> None:
        self.changes += 1

    def fail(self, endpoint: Endpoint, now: float, times: int = 1) -> None:
        for _ in range(times):
            endpoint.failures += 1  # what Upstream.failed counts before asking
            self.detector.failure(endpoint, now)

    @staticmethod
    def succeed(endpoint: Endpoint) -> None:
        endpoint.failures = 0  # what Exchange.finish does on a response below 500

    def ejected(self) -> list[Endpoint]:
        return [e for e in self.endpoints if e.ejected_until]


def test_outlier_ejects_after_consecutive_failures() -> None:
    d = Detector(failures=3)
    a = d.endpoints[0]
    d.fail(a, 100.0)
    d.fail(a, 101.0)
    assert a.available
    assert a.failures == 2
    assert d.changes == 0

    d.fail(a, 102.0)
    assert not a.available
    assert a.ejected_until == 112.0
    assert a.ejections == 1
    assert a.failures == 0
    assert d.changes == 1
    assert a.state()["ejected"] is True


def test_outlier_success_in_between_resets_the_count() -> None:
    d = Detector(failures=3)
    a = d.endpoints[0]
    for now in (100.0, 101.0, 102.0, 103.0):
        d.fail(a, now, times=2)
        d.succeed(a)
    d.fail(a, 104.0, times=2)
    assert a.available
    assert a.failures == 2
    assert a.ejections == 0
    assert d.changes == 0


def test_outlier_failures_while_ejected_do_not_extend_it() -> None:
    d = Detector(failures=3)
    a = d.endpoints[0]
    d.fail(a, 100.0, times=3)
    d.fail(a, 105.0, times=10)  # answers of requests still in flight
    assert a.ejected_until == 110.0
    assert a.ejections == 1
    assert d.changes == 1


def test_outlier_ejection_doubles_up_to_the_cap() -> None:
    d = Detector(failures=3, base="10s", most="35s")
    a = d.endpoints[0]
    now = 0.0
    lengths = []
    for _ in range(5):
        d.fail(a, now, times=3)
        lengths.append(a.ejected_until - now)
        now = a.ejected_until
        d.detector.tick(now)
        assert a.available
    assert lengths == [10.0, 20.0, 35.0, 35.0, 35.0]
    assert a.ejections == 5


def test_outlier_tick_returns_the_endpoint_when_the_ejection_ends() -> None:
    d = Detector(failures=3)
    a, b, _c = d.endpoints
    d.fail(a, 100.0, times=3)
    assert d.changes == 1

    d.detector.tick(105.0)
    d.detector.tick(109.99)
    assert not a.available
    assert d.changes == 1  # nothing changed, nobody is told

    d.detector.tick(110.0)
    assert a.available
    assert a.ejected_until == 0.0
    assert a.clean_since == 110.0
    assert d.changes == 2
    assert b.available

    d.detector.tick(111.0)
    assert d.changes == 2


def test_outlier_return_keeps_other_reasons_to_stay_out() -> None:
    d = Detector(failures=3)
    a = d.endpoints[0]
    d.fail(a, 100.0, times=3)
    a.drained = True  # an operator drained it meanwhile
    d.detector.tick(110.0)
    assert a.ejected_until == 0.0
    assert not a.available


@pytest.mark.parametrize(("after", "ejections"), [(9.0, 1), (10.0, 1), (10.5, 0), (500.0, 0)])
def test_outlier_forgives_after_a_clean_spell_as_long_as_the_ejection(
    after: float, ejections: int
) -> None:
    d = Detector(failures=3, base="10s")
    a = d.endpoints[0]
    d.fail(a, 0.0, times=3)
    d.detector.tick(10.0)  # back after 10 s
    d.detector.tick(10.0 + after)
    assert a.ejections == ejections
    d.fail(a, 10.0 + after, times=3)
    assert a.ejected_until - (10.0 + after) == (10.0 if ejections == 0 else 20.0)


def test_outlier_failures_after_return_are_not_a_clean_spell() -> None:
    """Forgiveness is for an endpoint that *serves cleanly* for as long as its last
    ejection lasted: one that keeps failing after its return is not forgiven."""
    d = Detector(failures=3, base="10s", most="300s")
    a = d.endpoints[0]
    d.fail(a, 0.0, times=3)  # ejected for 10 s
    d.detector.tick(10.0)  # back
    d.fail(a, 15.0)
    d.fail(a, 16.0)  # two failures, no success since its return
    d.detector.tick(20.5)  # 10.5 s after its return, but not 10 s clean
    assert a.ejections == 1
    d.fail(a, 21.0)  # the third consecutive failure
    assert a.ejected_until == 41.0  # doubled: 20 s


@pytest.mark.parametrize(
    ("count", "percent", "most"),
    [
        (2, 100, 1),
        (3, 100, 2),
        (3, 50, 1),
        (4, 50, 2),
        (4, 25, 1),
        (4, 24, 1),  # rounds down to 0, but one ejection is always allowed
        (10, 30, 3),
        (5, 0, 0),
        (1, 100, 0),
    ],
)
def test_outlier_max_ejected_percent(count: int, percent: int, most: int) -> None:
    d = Detector(count, failures=3, percent=percent)
    for endpoint in d.endpoints:
        d.fail(endpoint, 100.0, times=5)
    assert len(d.ejected()) == most
    assert [e.available for e in d.endpoints].count(True) == count - most
    assert d.changes == most


def test_outlier_frees_an_ejection_slot_on_return() -> None:
    d = Detector(2, failures=3, percent=100)
    a, b = d.endpoints
    d.fail(a, 100.0, times=3)
    d.fail(b, 101.0, times=3)
    assert d.ejected() == [a]
    assert b.available
    assert b.failures == 3  # still counted, only not acted upon

    d.detector.tick(110.0)
    d.fail(b, 111.0)
    assert d.ejected() == [b]
    assert b.ejected_until == 121.0
    assert a.available


@pytest.mark.parametrize(
    "reason",
    [
        {"healthy": False},  # active health checks took it out
        {"drained": True},  # an operator drained it
        {"remote_until": 1e9},  # another worker or gateway node ejected it
    ],
    ids=["unhealthy", "drained", "down_elsewhere"],
)
def test_outlier_never_ejects_the_last_available_endpoint(reason: dict[str, object]) -> None:
    """'One endpoint always stays, so the detector never empties an upstream'
    (PassiveHealthSettings.max_ejected_percent): an endpoint out for another reason
    counts against the limit too."""
    d = Detector(2, failures=3, percent=100)
    a, b = d.endpoints
    for name, value in reason.items():
        setattr(b, name, value)
    b.refresh()
    assert not b.available

    d.fail(a, 100.0, times=3)
    assert a.available
    assert a.ejected_until == 0.0


def test_outlier_availability_follows_ejection() -> None:
    d = Detector(3, failures=1, percent=50)
    a, b, c = d.endpoints
    d.fail(b, 100.0)
    assert [e.available for e in (a, b, c)] == [True, False, True]
    d.fail(c, 100.0)  # the 50 % limit: one of three
    assert [e.available for e in (a, b, c)] == [True, False, True]
    d.detector.tick(110.0)
    assert [e.available for e in (a, b, c)] == [True, True, True]


# ---------------------------------------------------------------------------- circuit breaker


def _breaker(
    ratio: float = 0.5,
    window: str = "10s",
    min_requests: int = 10,
    open_for: str = "30s",
    half_open: int = 3,
) -> CircuitBreaker:
    settings = _upstream(
        f"circuit_breaker: {{failure_ratio: {ratio}, window: {window}, "
        f"min_requests: {min_requests}, open_for: {open_for}, half_open_requests: {half_open}}}"
    ).circuit_breaker
    assert settings is not None
    return CircuitBreaker(settings)


def _record(breaker: CircuitBreaker, now: float, ok: int = 0, failed: int = 0) -> None:
    for _ in range(ok):
        breaker.record(True, now)
    for _ in range(failed):
        breaker.record(False, now)


def _open(breaker: CircuitBreaker, now: float) -> None:
    _record(breaker, now, failed=10)
    assert breaker.state == CircuitBreaker.OPEN


def test_breaker_starts_closed() -> None:
    breaker = _breaker()
    assert breaker.state == CircuitBreaker.CLOSED
    assert all(breaker.allow(100.0) for _ in range(100))


@pytest.mark.parametrize(
    ("ok", "failed", "state"),
    [
        (0, 9, "closed"),  # 100 % failures, but fewer than min_requests
        (0, 10, "open"),
        (5, 5, "open"),  # exactly the ratio
        (6, 4, "closed"),
        (11, 9, "closed"),  # 45 %
        (10, 10, "open"),
        (40, 1, "closed"),
    ],
)
def test_breaker_opens_on_ratio_with_enough_requests(ok: int, failed: int, state: str) -> None:
    breaker = _breaker(ratio=0.5, min_requests=10)
    _record(breaker, 100.0, ok=ok, failed=failed)
    assert breaker.state == state
    assert breaker.allow(100.5) is (state == "closed")


def test_breaker_open_refuses_and_counts_down() -> None:
    breaker = _breaker(open_for="30s")
    _open(breaker, 100.0)
    assert breaker.opened_at == 100.0
    for now in (100.0, 110.0, 129.99):
        assert breaker.allow(now) is False
        assert breaker.state == CircuitBreaker.OPEN


@pytest.mark.parametrize(
    ("elapsed", "seconds"),
    [(0.0, 30), (0.5, 30), (12.25, 18), (20.0, 10), (29.0, 1), (29.5, 1), (29.99, 1), (45.0, 1)],
)
def test_breaker_retry_after(elapsed: float, seconds: int) -> None:
    breaker = _breaker(open_for="30s")
    _open(breaker, 100.0)
    assert breaker.retry_after(100.0 + elapsed) == seconds


def test_breaker_half_open_lets_exactly_the_trials_through() -> None:
    breaker = _breaker(open_for="30s", half_open=3)
    _open(breaker, 100.0)
    assert [breaker.allow(130.0) for _ in range(5)] == [True, True, True, False, False]
    assert breaker.state == CircuitBreaker.HALF_OPEN
    assert breaker.allow(150.0) is False  # until the trials are answered...
    assert breaker.retry_after(150.0) == 1
    # ...or, if none ever is (the clients left, no endpoint was free), a new round of
    # trials after twice open_for, rather than half-open for ever.
    assert [breaker.allow(200.0) for _ in range(4)] == [True, True, True, False]


def test_breaker_closes_after_the_trials_succeed() -> None:
    breaker = _breaker(open_for="30s", half_open=3)
    _open(breaker, 100.0)
    assert all(breaker.allow(130.0) for _ in range(3))
    breaker.record(True, 130.1)
    breaker.record(True, 130.2)
    assert breaker.state == CircuitBreaker.HALF_OPEN
    breaker.record(True, 130.3)
    assert breaker.state == CircuitBreaker.CLOSED
    assert all(breaker.allow(130.4) for _ in range(50))
    # The failures from before it opened are forgotten.
    _record(breaker, 131.0, failed=9)
    assert breaker.state == CircuitBreaker.CLOSED


@pytest.mark.parametrize("successes_first", [0, 1, 2])
def test_breaker_any_failed_trial_reopens(successes_first: int) -> None:
    breaker = _breaker(open_for="30s", half_open=3)
    _open(breaker, 100.0)
    assert all(breaker.allow(130.0) for _ in range(3))
    _record(breaker, 131.0, ok=successes_first)
    breaker.record(False, 132.0)
    assert breaker.state == CircuitBreaker.OPEN
    assert breaker.opened_at == 132.0
    assert breaker.allow(132.0) is False
    assert breaker.retry_after(132.0) == 30
    # Half-open again after another open_for, with fresh trials.
    assert breaker.allow(161.9) is False
    assert [breaker.allow(162.0) for _ in range(4)] == [True, True, True, False]


@pytest.mark.parametrize(
    ("later", "state"),
    [
        (105.0, "open"),
        (109.9, "open"),  # the 9 failures at 100 s are still in the 10 s window
        (110.0, "closed"),  # ...and now out of it
        (111.0, "closed"),
        (500.0, "closed"),
    ],
)
def test_breaker_old_failures_leave_the_window(later: float, state: str) -> None:
    breaker = _breaker(ratio=0.5, window="10s", min_requests=10)
    _record(breaker, 100.0, failed=9)
    breaker.record(False, later)
    assert breaker.state == state


def test_breaker_successes_after_the_window_keep_it_closed() -> None:
    breaker = _breaker(ratio=0.5, window="10s", min_requests=10)
    _record(breaker, 100.0, failed=9)
    # Over all time this is 10 failures of 15; in the window it is 1 of 6.
    _record(breaker, 111.0, ok=5, failed=1)
    assert breaker.state == CircuitBreaker.CLOSED
    assert breaker.allow(111.0) is True


def test_breaker_window_slides_second_by_second() -> None:
    breaker = _breaker(ratio=0.5, window="10s", min_requests=10)
    for second in range(100, 109):
        _record(breaker, second + 0.5, ok=1)
    # 9 successes over 100..108; at 115 only those of 106, 107 and 108 remain.
    _record(breaker, 115.0, failed=6)
    assert breaker.state == CircuitBreaker.CLOSED  # 6 failures of 9 requests
    breaker.record(False, 115.5)
    assert breaker.state == CircuitBreaker.OPEN  # 7 of 10


# ---------------------------------------------------------------------------- retry budget


def _budget(ratio: float, floor: float) -> RetryBudget:
    settings = _upstream(f"retries: {{budget: {{ratio: {ratio}, min_per_second: {floor}}}}}")
    return RetryBudget(settings.retries.budget)


def _spend_all(budget: RetryBudget) -> int:
    spent = 0
    while budget.try_spend():
        spent += 1
    return spent


@pytest.mark.parametrize(
    ("floor", "tokens"), [(0, 2.0), (0.5, 2.0), (1, 2.0), (5, 10.0), (20, 40.0)]
)
def test_budget_starts_with_its_cap(floor: float, tokens: float) -> None:
    assert _budget(0.2, floor).tokens == tokens


def test_budget_try_spend_takes_one_token() -> None:
    budget = _budget(0.2, 5)
    assert budget.try_spend() is True
    assert budget.tokens == 9.0
    assert _spend_all(budget) == 9
    assert budget.tokens == 0.0
    assert budget.try_spend() is False
    assert budget.tokens == 0.0


def test_budget_tick_adds_ratio_per_request_and_floor_per_second() -> None:
    budget = _budget(0.2, 5)
    _spend_all(budget)
    budget.tick(0.1, 10)  # 0.2 x 10 + 5 x 0.1
    assert budget.tokens == pytest.approx(2.5)
    assert _spend_all(budget) == 2
    assert budget.tokens == pytest.approx(0.5)
    budget.tick(0.1, 0)
    assert budget.tokens == pytest.approx(1.0)
    assert _spend_all(budget) == 1


def test_budget_quiet_period_banks_only_the_cap() -> None:
    budget = _budget(0.2, 5)
    _spend_all(budget)
    budget.tick(3600.0, 0)
    assert budget.tokens == 10.0
    budget.tick(0.1, 0)
    assert budget.tokens == 10.0
    assert _spend_all(budget) == 10


def test_budget_ratio_bounds_retries_by_requests() -> None:
    budget = _budget(0.2, 0)
    spent = _spend_all(budget)
    # 1000 requests in sweeps of 10, every retry allowed taken at once.
    for _ in range(100):
        budget.tick(0.1, 10)
        spent += _spend_all(budget)
    assert spent == 202  # 0.2 x 1000 + the cap of 2


@pytest.mark.parametrize("per_sweep", [1, 5, 10, 100, 1000])
def test_budget_never_exceeds_ratio_plus_cap(per_sweep: int) -> None:
    budget = _budget(0.2, 0)
    spent = _spend_all(budget)
    for _ in range(1000 // per_sweep):
        budget.tick(0.1, per_sweep)
        spent += _spend_all(budget)
    assert spent <= 202


def test_budget_no_requests_no_ratio_no_retries() -> None:
    budget = _budget(0.2, 0)
    assert _spend_all(budget) == 2
    for _ in range(100):
        budget.tick(0.1, 0)
    assert budget.tokens == 0.0
    assert budget.try_spend() is False


def test_budget_floor_allows_about_its_rate_without_requests() -> None:
    budget = _budget(0.2, 5)
    assert _spend_all(budget) == 10
    per_second = []
    for _ in range(10):
        spent = 0
        for _ in range(10):  # the worker's 100 ms sweeps
            budget.tick(0.1, 0)
            spent += _spend_all(budget)
        per_second.append(spent)
    assert per_second == [5] * 10
