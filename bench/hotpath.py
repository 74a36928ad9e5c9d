"""Pure hot-path cost: one request through the gateway's protocol objects per
iteration, with in-memory transports, so that only the gateway's own work (parsing,
routing, header handling, pooling, metrics) is measured: no syscalls, no event loop
wake-ups. Use it to compare changes quickly; the real benchmark is bench/gateway.py.

    .venv/bin/python bench/hotpath.py [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time
from typing import Any

from meshgate.config import loads
from meshgate.gateway.protocol import ClientConnection
from meshgate.gateway.proxy import UpstreamConnection
from meshgate.gateway.worker import Worker

CONFIG = """
gateway: {listen: 127.0.0.1:0, access_log: {enabled: false}}
upstreams:
  up: {endpoints: ["127.0.0.1:9"]}
routes:
  - {name: api, upstream: up, match: {path_prefix: /api}}
  - {name: bench, upstream: up}
"""

REQUEST = b"GET /100b HTTP/1.1\r\nHost: 127.0.0.1:18080\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 15:40:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 100\r\n"
    b"Last-Modified: Thu, 26 Nov 2026 14:00:00 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "6925f0a0-64"\r\nAccept-Ranges: bytes\r\n\r\n' + b"x" * 100
)


class FakeTransport(asyncio.Transport):
    """Accepts writes and counts bytes; never blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0
        self.closed = False

    # As cheap as uvloop's C methods: count calls, not bytes.
    def write(self, data: Any) -> None:
        self.written += 1

    def writelines(self, chunks: Any) -> None:
        self.written += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


TRACING: float | None = None
"""With ``--tracing RATIO``: that share of requests is traced, and each batch of span
records is encoded as OTLP in the measured thread (as the exporter thread would), so
the figure is tracing's whole CPU cost per request; nothing is sent."""


async def setup() -> tuple[ClientConnection, UpstreamConnection, FakeTransport]:
    text = CONFIG
    if TRACING is not None:
        # A port where nobody listens: the exporter thread never gets a batch (flush is
        # never called); the benchmark encodes the records itself.
        text = text.replace(
            "access_log: {enabled: false}",
            "access_log: {enabled: false}, tracing: "
            f"{{endpoint: 'http://127.0.0.1:9', ratio: {TRACING}}}",
        )
    worker = Worker(loads(text))
    client = ClientConnection(worker)
    client_transport = FakeTransport()
    client.connection_made(client_transport)
    upstream = worker.runtime.upstreams["up"]
    endpoint = upstream.endpoints[0]
    conn = UpstreamConnection(upstream, endpoint)
    conn.connection_made(FakeTransport())
    endpoint.open += 1
    endpoint.idle.append(conn)
    return client, conn, client_transport


def run(iterations: int, profile: bool) -> float:
    client, conn, client_transport = asyncio.run(setup())
    feed_client = client.data_received
    feed_upstream = conn.data_received
    tracer = client.worker.tracer

    def loop(n: int) -> None:
        for i in range(n):
            feed_client(REQUEST)
            feed_upstream(RESPONSE)
            if tracer is not None and i % 256 == 255:
                records, tracer.records = tracer.records, []
                if records:
                    tracer._encoder.request(records, 0.0)

    loop(1000)
    if not client_transport.written or client_transport.closed:
        raise RuntimeError("the gateway did not answer the benchmark's requests")
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        loop(iterations)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return 0.0
    start = time.perf_counter()
    loop(iterations)
    return (time.perf_counter() - start) / iterations * 1e6


def run_once(iterations: int) -> None:
    client, conn, _ = asyncio.run(setup())
    tracer = client.worker.tracer
    for i in range(iterations):
        client.data_received(REQUEST)
        conn.data_received(RESPONSE)
        if tracer is not None and i % 256 == 255:
            records, tracer.records = tracer.records, []
            tracer._encoder.request(records, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200_000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--tracing",
        type=float,
        metavar="RATIO",
        help="trace this share of requests and encode their spans in the measured loop",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="run the iterations once, untimed (for counting instructions under valgrind)",
    )
    args = parser.parse_args()
    global TRACING  # noqa: PLW0603 - a setting of this one-shot script
    TRACING = args.tracing
    if args.once:
        run_once(args.iterations)
        return
    if args.profile:
        run(args.iterations // 4, True)
        return
    best = min(run(args.iterations, False) for _ in range(5))
    print(f"{best:.2f} us per request (best of 5, {args.iterations} requests each)")


if __name__ == "__main__":
    main()
