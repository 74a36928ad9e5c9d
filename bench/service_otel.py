"""What OpenTelemetry costs a service: the shop's users service with tracing off and
with every request traced (100 % sampling, spans exported as OTLP/HTTP to a local
sink), as requests per CPU-second of the service's process.

    .venv/bin/python bench/service_otel.py            # 5 reps of 10 s per path and mode
    .venv/bin/python bench/service_otel.py --quick    # 3 s, 2 reps: a smoke test

Two paths of the users service (``meshgate serve examples.shop.users.app:service``,
SQLite, in-memory cache): ``GET /users/1`` (a cache hit: a server span and a cache
span) and ``GET /users?limit=5`` (a query each time: a server span and the SQL
statements' spans). Requests carry a sampled ``traceparent``, as the gateway sends
it. The service runs alone on CPU 0; wrk and the sink share CPU 1. Modes are
interleaved within each rep, so that drift spreads over both. ``lost`` is
``1 - on/off`` of requests per CPU-second, paired within a rep: its median and range
over the reps. The CPU of the service counts its exporter thread, so encoding and
sending the spans is part of the cost.

Needs Linux with CPUs 0 and 1, wrk and taskset (``apt-get install wrk util-linux``).
Writes a markdown table to stdout and the runs to ``bench/results/service_otel-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# The gateway benchmark's helpers (processes pinned and stopped by pid, wrk, CPU of a
# process tree) are imported from beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway import (
    LOAD_CPU,
    PROXY_CPU,
    BenchError,
    PortAllocator,
    ProcessGroup,
    find_tool,
    log,
    run_wrk,
    tree_cpu_seconds,
    wait_for_port,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PATHS = ("/users/1", "/users?limit=5")
MODES = ("off", "on")
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

SINK = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

seen = {"posts": 0, "bytes": 0}

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        seen["posts"] += 1
        seen["bytes"] += len(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        answer = json.dumps(seen).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


@dataclass
class Run:
    path: str
    mode: str
    rep: int
    requests: int
    seconds: float
    rps: float
    p99_ms: float | None
    errors: int
    cpu_seconds: float

    @property
    def per_cpu_second(self) -> float:
        return self.requests / self.cpu_seconds if self.cpu_seconds else 0.0


def _sink_count(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as answer:
        found: dict[str, int] = json.loads(answer.read())
        return found


def _post(url: str, body: dict[str, str]) -> None:
    request = urllib.request.Request(  # noqa: S310 - loopback
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
        if answer.status != 201:
            raise BenchError(f"POST {url} answered {answer.status}")


def _service_env(workdir: Path, mode: str, sink: int) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OTEL_", "MESHGATE_REGISTRY", "USERS_"))
    }
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "USERS_DATABASE_URL": f"sqlite:///{workdir / mode}.db",
            "USERS_CACHE_URL": "memory://",
            "USERS_CACHE_TTL": "3600",
            "MESHGATE_MIGRATE": "1",
            "MESHGATE_INSTANCE": f"users-{mode}",
            # The processes run in a temporary folder: the shop is imported from here.
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
    )
    if mode == "on":
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{sink}"
        env["OTEL_TRACES_SAMPLER_ARG"] = "1"
    return env


def _median_range(values: Sequence[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def table(runs: Sequence[Run]) -> str:
    lines = [
        "| path | mode | req/s | req/CPU-s (median, range) | lost vs off (median, range) |",
        "|---|---|---:|---:|---:|",
    ]
    for path in PATHS:
        by_rep = {(r.mode, r.rep): r for r in runs if r.path == path}
        reps = sorted({r.rep for r in runs if r.path == path})
        for mode in MODES:
            mine = [by_rep[(mode, rep)] for rep in reps if (mode, rep) in by_rep]
            if not mine:
                continue
            rps = statistics.median(r.rps for r in mine)
            eff, low, high = _median_range([r.per_cpu_second for r in mine])
            lost = "-"
            if mode == "on":
                paired = [
                    1 - by_rep[("on", rep)].per_cpu_second / by_rep[("off", rep)].per_cpu_second
                    for rep in reps
                    if ("on", rep) in by_rep and ("off", rep) in by_rep
                ]
                if paired:
                    mid, lo, hi = _median_range(paired)
                    lost = f"{mid:.1%} ({lo:.1%} to {hi:.1%})"
            lines.append(
                f"| `{path}` | {mode} | {rps:,.0f} "
                f"| {eff:,.0f} ({low:,.0f} to {high:,.0f}) | {lost} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, help="seconds per measured run (10)")
    parser.add_argument("--reps", type=int, help="interleaved repetitions (5)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds, unmeasured")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="3 s runs, 2 reps")
    parser.add_argument("--json", type=Path, help="where the results go")
    options = parser.parse_args(argv)
    duration = options.duration or (3.0 if options.quick else 10.0)
    reps = options.reps or (2 if options.quick else 5)
    tools = {name: find_tool(name) for name in ("wrk", "taskset")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        raise BenchError(f"{', '.join(missing)} missing: apt-get install wrk util-linux")
    found = {name: str(path) for name, path in tools.items()}
    if not {PROXY_CPU, LOAD_CPU} <= os.sched_getaffinity(0):
        raise BenchError(f"needs CPUs {PROXY_CPU} and {LOAD_CPU}")
    started = dt.datetime.now(dt.UTC)
    runs: list[Run] = []
    ports = PortAllocator()
    with tempfile.TemporaryDirectory(prefix="service-otel-") as tmp:
        workdir = Path(tmp)
        procs = ProcessGroup(workdir, found["taskset"])
        try:
            sink_port = ports.one()
            sink = procs.start("sink", [sys.executable, "-c", SINK, str(sink_port)], cpu=LOAD_CPU)
            wait_for_port(sink, sink_port)
            services: dict[str, tuple[Any, int]] = {}
            for mode in MODES:
                port = ports.one()
                argv = [sys.executable, "-m", "meshgate", "serve"]
                argv += ["examples.shop.users.app:service", "--listen", f"127.0.0.1:{port}"]
                argv += ["--log-level", "info"]
                proc = procs.start(
                    f"users-{mode}",
                    argv,
                    cpu=PROXY_CPU,
                    env=_service_env(workdir, mode, sink_port),
                )
                wait_for_port(proc, port, timeout=60)
                for i in range(5):
                    _post(
                        f"http://127.0.0.1:{port}/users",
                        {"email": f"bench{i}@example.com", "name": f"Bench {i}"},
                    )
                services[mode] = (proc, port)
            headers = {"traceparent": TRACEPARENT}
            for path in PATHS:
                for mode in MODES:
                    _, port = services[mode]
                    log(f"warmup {path} {mode}")
                    run_wrk(
                        found,
                        f"http://127.0.0.1:{port}{path}",
                        connections=options.connections,
                        duration=options.warmup,
                        headers=headers,
                        timeout=2.0,
                    )
                for rep in range(1, reps + 1):
                    for mode in MODES:
                        proc, port = services[mode]
                        before = tree_cpu_seconds(proc.pid)
                        result, _, _ = run_wrk(
                            found,
                            f"http://127.0.0.1:{port}{path}",
                            connections=options.connections,
                            duration=duration,
                            headers=headers,
                            timeout=2.0,
                        )
                        # The exporter sends its last batch within its delay (5 s):
                        # waiting for it (in both modes alike) counts the CPU of every
                        # span of this run.
                        time.sleep(5.5)
                        cpu = tree_cpu_seconds(proc.pid) - before
                        run = Run(
                            path,
                            mode,
                            rep,
                            result.requests,
                            result.seconds,
                            result.rps,
                            result.p99_ms,
                            result.errors,
                            cpu,
                        )
                        runs.append(run)
                        log(
                            f"{path} {mode} rep {rep}: {run.rps:,.0f} req/s, "
                            f"{run.per_cpu_second:,.0f} req/CPU-s, {run.errors} errors"
                        )
            exported = _sink_count(sink_port)
            if exported["posts"] == 0:
                raise BenchError("the sink received no export: tracing was not on")
        finally:
            procs.stop_all()
    print(table(runs))
    print(
        f"\nspans exported: {exported['posts']} OTLP requests, {exported['bytes']:,} bytes; "
        f"{duration:g} s runs, {reps} reps, {options.connections} connections"
    )
    out = options.json or (
        REPO_ROOT / "bench" / "results" / f"service_otel-{started:%Y%m%dT%H%M%SZ}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "started": started.isoformat(),
                "options": {"duration": duration, "reps": reps, **vars(options), "json": str(out)},
                "exported": exported,
                "runs": [{**asdict(r), "per_cpu_second": r.per_cpu_second} for r in runs],
            },
            indent=2,
            default=str,
        )
    )
    log(f"results in {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        log(f"error: {exc}")
        sys.exit(1)
