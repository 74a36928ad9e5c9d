"""A worker's own state across reloads (serving is tested over sockets elsewhere):
endpoints, their health and pools survive a reload that keeps them; the tracer and
the access log follow their settings."""

from __future__ import annotations

from meshgate.config import loads
from meshgate.gateway.worker import Worker

CONFIG = """
gateway: {{listen: 127.0.0.1:0, access_log: {{enabled: {log}}}{tracing}}}
upstreams: {{up: {{endpoints: ['127.0.0.1:9'{more}]}}}}
routes: [{{name: r, upstream: up}}]
"""


def config(*, log: str = "false", tracing: str = "", more: str = "") -> str:
    return CONFIG.format(log=log, tracing=tracing, more=more)


async def test_a_reload_keeps_the_endpoints_it_keeps() -> None:
    worker = Worker(loads(config()))
    try:
        before = worker.runtime.upstreams["up"].endpoints[0]
        before.failures = 3  # health state that must survive
        worker.apply(loads(config(more=", '127.0.0.1:10'")))
        endpoints = worker.runtime.upstreams["up"].endpoints
        assert endpoints[0] is before
        assert before.failures == 3
        assert [e.label for e in endpoints] == ["127.0.0.1:9", "127.0.0.1:10"]
        assert worker.reloads == 1
    finally:
        worker.close()


async def test_the_tracer_and_the_access_log_follow_their_settings(tmp_path: object) -> None:
    worker = Worker(loads(config()))
    try:
        assert worker.tracer is None
        assert worker.access_log is None
        traced = config(tracing=", tracing: {endpoint: 'http://127.0.0.1:9'}")
        worker.apply(loads(traced))
        tracer = worker.tracer
        assert tracer is not None
        assert worker.runtime.tracer is tracer
        assert tracer.rid_prefix == worker.rid_prefix
        worker.apply(loads(traced.replace("r, upstream", "r2, upstream")))
        assert worker.tracer is tracer  # unchanged settings: the same tracer
        worker.apply(loads(config(log="true")))
        assert worker.tracer is None
        assert worker.runtime.tracer is None
        assert worker.access_log is not None
    finally:
        worker.close()


async def test_request_ids_are_unique_and_carry_the_worker_prefix() -> None:
    one, two = Worker(loads(config())), Worker(loads(config()))
    try:
        ids = {one.next_request_id() for _ in range(100)} | {
            two.next_request_id() for _ in range(100)
        }
        assert len(ids) == 200
        assert all(len(i) == 32 for i in ids)
    finally:
        one.close()
        two.close()
