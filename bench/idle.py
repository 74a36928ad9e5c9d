"""Idle keep-alive connections: memory per connection held by one proxy process, side by
side with nginx, and whether requests on other connections notice them.

    .venv/bin/python bench/idle.py [--connections 10000] [--reps 3]

For each target (nginx with one worker, meshgate with one worker), in turn, with the
same static-file nginx upstream: measure the proxy's memory (PSS of its process tree,
from /proc/<pid>/smaps_rollup), open N client connections that each make one request
and then stay idle, measure again, and time requests on a fresh connection before and
while the N are held (p50/p99 of 500 sequential requests). Prints a table and writes
the results as JSON (``bench/results/idle-<UTC>.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import gateway as gw  # the gateway benchmark's process and config helpers

REQUEST = b"GET /100b HTTP/1.1\r\nHost: bench\r\n\r\n"


def pss_kib(root: int) -> int:
    """Proportional set size of ``root``'s process tree, in KiB (shared pages split)."""
    total = 0
    for pid in gw.process_tree(root):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
                break
    return total


async def _one_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(REQUEST)
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)


async def latencies(port: int, count: int = 500) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    try:
        for _ in range(count):
            start = time.perf_counter()
            await _one_request(reader, writer)
            out.append((time.perf_counter() - start) * 1000)
    finally:
        writer.close()
    return out


async def hold(port: int, count: int) -> list[asyncio.StreamWriter]:
    """``count`` connections, each having made one request, left open and idle."""
    writers: list[asyncio.StreamWriter] = []
    sem = asyncio.Semaphore(200)

    async def open_one() -> None:
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await _one_request(reader, writer)
            writers.append(writer)

    await asyncio.gather(*(open_one() for _ in range(count)))
    return writers


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(
    name: str, root: int, port: int, count: int, baseline: int | None = None
) -> dict[str, Any]:
    """``baseline``: the PSS to count from (nginx's with room for few connections, since
    it allocates every connection slot it may need when it starts)."""
    before_ms = await latencies(port)
    before = pss_kib(root) if baseline is None else baseline
    writers = await hold(port, count)
    await asyncio.sleep(1.0)  # let the proxy settle (buffers freed, counters flushed)
    after = pss_kib(root)
    during_ms = await latencies(port)
    alive = sum(1 for w in writers if not w.is_closing())
    for writer in writers:
        writer.transport.abort()
    per_conn = (after - before) * 1024 / count
    gw.log(
        f"{name}: {count} idle connections ({alive} still open): "
        f"{(after - before) / 1024:.1f} MiB, {per_conn:,.0f} B each; "
        f"p99 {pct(before_ms, 0.99):.2f} ms before, {pct(during_ms, 0.99):.2f} ms while held"
    )
    return {
        "target": name,
        "connections": count,
        "still_open": alive,
        "pss_before_kib": before,
        "pss_after_kib": after,
        "bytes_per_connection": per_conn,
        "p50_before_ms": pct(before_ms, 0.5),
        "p99_before_ms": pct(before_ms, 0.99),
        "p50_during_ms": pct(during_ms, 0.5),
        "p99_during_ms": pct(during_ms, 0.99),
    }


def nginx_conf(workdir: Path, port: int, upstream: int, slots: int) -> str:
    return f"""worker_processes 1;
daemon off;
master_process on;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
worker_rlimit_nofile 65536;
{"user root root;" if os.geteuid() == 0 else ""}
events {{ worker_connections {slots}; }}
http {{
    access_log off;
{gw._nginx_temp_paths(workdir, "nginx")}
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    upstream up {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.connections * 2 + 1000
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    tools = gw.ensure_tools()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="meshgate-idle-") as tmp:
        workdir = Path(tmp)
        procs = gw.ProcessGroup(workdir, tools.get("taskset", "taskset"))
        ports = gw.PortAllocator()
        try:
            upstream_port, nginx_port, meshgate_port = ports.take(3)
            docroot = workdir / "www"
            docroot.mkdir()
            (docroot / "100b").write_bytes(b"x" * 100)
            upconf = workdir / "upstream.conf"
            upconf.write_text(gw.upstream_nginx_conf(workdir, [upstream_port], docroot))
            (workdir / "upstream-temp").mkdir()
            up = procs.start(
                "upstream", gw.nginx_argv(tools["nginx"], workdir, "upstream", upconf), cpu=None
            )
            gw.wait_for_port(up, upstream_port)
            mconf = workdir / "meshgate.yaml"
            mconf.write_text(
                json.dumps(
                    {
                        "gateway": {
                            "listen": f"127.0.0.1:{meshgate_port}",
                            "workers": 1,
                            "access_log": {"enabled": False},
                            "admin": {"listen": "127.0.0.1:0"},
                            "keepalive_timeout": "300s",
                        },
                        "upstreams": {"up": {"endpoints": [f"127.0.0.1:{upstream_port}"]}},
                        "routes": [{"name": "bench", "upstream": "up"}],
                    }
                )
            )

            def start_nginx(slots: int) -> gw.Proc:
                conf = workdir / f"nginx-{slots}.conf"
                conf.write_text(nginx_conf(workdir, nginx_port, upstream_port, slots))
                argv = gw.nginx_argv(tools["nginx"], workdir, "nginx", conf)
                proc = procs.start("nginx", argv, cpu=None)
                gw.wait_for_port(proc, nginx_port)
                return proc

            for rep in range(args.reps):
                # Every measurement on a fresh process: memory freed by an earlier
                # round stays in the process and would be reused for free.
                gw.log(f"[rep {rep + 1}/{args.reps}] nginx")
                small = start_nginx(1024)
                asyncio.run(latencies(nginx_port, 50))
                baseline = pss_kib(small.pid)
                procs.stop(small)
                big = start_nginx(args.connections + 1024)
                result = asyncio.run(
                    measure("nginx", big.pid, nginx_port, args.connections, baseline)
                )
                procs.stop(big)
                results.append({**result, "rep": rep + 1})
                gw.log(f"[rep {rep + 1}/{args.reps}] meshgate")
                mesh = procs.start(
                    "meshgate",
                    [sys.executable, "-m", "meshgate", "gateway", str(mconf), "--workers", "1"],
                    cpu=None,
                )
                gw.wait_for_port(mesh, meshgate_port)
                asyncio.run(latencies(meshgate_port, 50))
                result = asyncio.run(measure("meshgate", mesh.pid, meshgate_port, args.connections))
                procs.stop(mesh)
                results.append({**result, "rep": rep + 1})
        finally:
            procs.stop_all()
    table: list[str] = [
        (
            "| target | connections | bytes per idle connection (median, range) "
            "| p99 before | p99 while held |"
        ),
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("nginx", "meshgate"):
        rows = [r for r in results if r["target"] == name]
        per = [r["bytes_per_connection"] for r in rows]
        table.append(
            f"| {name} | {args.connections} | {statistics.median(per):,.0f} "
            f"({min(per):,.0f} to {max(per):,.0f}) | "
            f"{statistics.median(r['p99_before_ms'] for r in rows):.2f} ms | "
            f"{statistics.median(r['p99_during_ms'] for r in rows):.2f} ms |"
        )
    nginx_per = statistics.median(
        r["bytes_per_connection"] for r in results if r["target"] == "nginx"
    )
    mesh_per = statistics.median(
        r["bytes_per_connection"] for r in results if r["target"] == "meshgate"
    )
    table.append("")
    table.append(f"meshgate / nginx memory per idle connection: {mesh_per / nginx_per:.2f}x")
    print("\n".join(table))
    out = args.json or Path(__file__).parent / "results" / (
        "idle-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + ".json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"options": vars(args) | {"json": str(out)}, "runs": results}, indent=2)
    )
    print(f"results: {out}")


if __name__ == "__main__":
    main()
