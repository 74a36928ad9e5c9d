#!/usr/bin/env python3
"""Benchmark meshgate's gateway against nginx and HAProxy as reverse proxies.

Run it with the project's virtualenv; it starts meshgate with the interpreter
that runs it (``sys.executable``)::

    .venv/bin/python bench/gateway.py            # or: make bench
    .venv/bin/python bench/gateway.py --quick    # 3 s runs, one repetition

It installs what it lacks (nginx, haproxy, wrk) with apt-get, runs its own
instances of every server from a temporary directory on free loopback ports
(a system nginx or haproxy service is left alone), prints a markdown table and
writes every raw run plus the medians to ``bench/results/gateway-<UTC>.json``.

Methodology
-----------
Topology (two cores). CPU 0 runs only the proxy under test. CPU 1 runs the
load generator (wrk, one thread) and the upstream (nginx, one worker, serving
static files of 100 B, 10 KiB and 1 MiB). Pinning is done with ``taskset``; the
affinity is inherited, so nginx's worker and meshgate's worker processes stay
on their core too. wrk keeps its connections open for the whole run; every
proxy keeps a pool of keep-alive connections to the upstream (nginx
``keepalive``, HAProxy ``http-reuse always``, meshgate's own pool).

Targets. ``direct`` is wrk straight to the upstream: a reference for what the
load side can do, not a proxy. ``nginx``, ``haproxy`` and ``meshgate`` proxy
every request to the upstream (scenario ``three``: to three upstream ports,
round robin; ``direct`` then hits the first one).

Interleaving. Per scenario the servers start once; a warmup round (``--warmup``
seconds per body and target, not recorded) runs first; then
``for rep: for body: for target: wrk``. Slow drift (thermal state, noisy
neighbours, caches) thus spreads over all targets instead of biasing the one
that happened to run last. Each metric is reported as the median over reps.

CPU accounting. Right before and right after each wrk run the benchmark sums
utime + stime (+ cutime + cstime, so that a child that exits mid-run is not
lost) from ``/proc/<pid>/stat`` over the proxy's whole process tree: the
process it started plus every descendant, found by scanning ``/proc`` for
parent pids (for meshgate: the supervisor and its spawned workers; for nginx:
master and worker). The delta is the proxy's CPU seconds for that run. The
resolution is one clock tick (usually 10 ms) per process. The same is recorded
for the upstream; wrk's own CPU comes from ``getrusage(RUSAGE_CHILDREN)``.

Efficiency and ratios. ``req/CPU-s`` = wrk's total requests / proxy CPU
seconds: how many requests the proxy serves per second of one core. It is the
primary number because the proxies are not all limited by the same thing: the
proxy has a core to itself while wrk and the upstream share the other one, so
a fast proxy can be limited by CPU 1 (see the ``CPU1 busy`` column) and its
req/s then says little about the proxy. ``eff vs nginx`` = a target's
req/CPU-s / nginx's req/CPU-s in the same scenario, body and rep (paired, so
that drift cancels), median over reps; ``req/s vs nginx`` is the same for plain
throughput. Caveat: a proxy at 100 % of its core batches more work per
``epoll_wait`` than one at 40 %, so efficiency measured at very different load
levels is only roughly comparable.

Errors. ``errors`` = wrk's "Non-2xx or 3xx responses" plus its socket errors
(connect, read, write, timeout), summed over all reps (not a median, so that a
single failing rep shows). The JSON keeps the breakdown per run.

Scenarios are entries in ``SCENARIOS``: a :class:`Scenario` says how many
upstream instances there are and may add meshgate configuration (gateway,
upstream, route or whole-document overlays), nginx and HAProxy snippets,
request headers for wrk, and a ``prepare`` hook that starts extra services
(e.g. Redis) and returns an adjusted scenario (e.g. with a freshly signed JWT).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import grp
import importlib.util
import json
import os
import pwd
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"

PROXY_CPU = 0  # the proxy under test, alone
LOAD_CPU = 1  # wrk and the upstream
CLK_TCK = os.sysconf("SC_CLK_TCK")

SIZES: dict[str, int] = {"100b": 100, "10k": 10 * 1024, "1m": 1024 * 1024}
LARGE_BODY = 1024 * 1024  # bodies this big use --connections-large
TARGETS: tuple[str, ...] = ("direct", "nginx", "haproxy", "meshgate")
PROXIES: tuple[str, ...] = ("nginx", "haproxy", "meshgate")
REFERENCE = "nginx"  # the ratios divide by this target's numbers

# command -> Debian package that provides it
TOOLS: dict[str, str] = {
    "nginx": "nginx",
    "haproxy": "haproxy",
    "wrk": "wrk",
    "taskset": "util-linux",
}

START_TIMEOUT = 30.0  # seconds a server may take to accept connections
MESHGATE_STOP_TIMEOUT = 45.0  # its default drain_timeout is 30 s, plus 5 s for the workers
STOP_TIMEOUT = 10.0


class BenchError(Exception):
    """A failure that stops the benchmark with a message (no traceback)."""


def log(message: str) -> None:
    """Progress and diagnostics go to stderr; the table goes to stdout."""
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    """One benchmark setup. Everything but ``name`` and ``description`` is optional.

    The ``meshgate_*`` mappings are deep-merged into the generated meshgate config:
    ``meshgate_gateway`` into ``gateway:``, ``meshgate_upstream`` into the upstream
    ``up``, ``meshgate_route`` into the one route ``bench``, ``meshgate_config`` into
    the whole document (for new top-level sections). The nginx and HAProxy strings
    are pasted verbatim into the proxy configs at the places their names say.
    """

    name: str
    description: str
    upstreams: int = 1
    """How many upstream instances (server blocks of the upstream nginx, one port each)."""
    meshgate_gateway: Mapping[str, Any] = field(default_factory=dict)
    meshgate_upstream: Mapping[str, Any] = field(default_factory=dict)
    meshgate_route: Mapping[str, Any] = field(default_factory=dict)
    meshgate_config: Mapping[str, Any] = field(default_factory=dict)
    nginx_http: str = ""
    """Directives for the proxy nginx's ``http {}`` block (e.g. ``limit_req_zone``)."""
    nginx_upstream: str = ""
    """Directives for its ``upstream up {}`` block (e.g. ``random two least_conn;``)."""
    nginx_location: str = ""
    """Directives for its ``location / {}`` block (e.g. ``auth_jwt``)."""
    haproxy_global: str = ""
    haproxy_frontend: str = ""
    haproxy_backend: str = ""
    haproxy_balance: str = "roundrobin"
    """HAProxy's ``balance`` algorithm (e.g. ``random(2)`` for power of two choices)."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Request headers sent by wrk and by the pre-flight check (e.g. Authorization)."""
    prepare: Callable[[ScenarioContext], Scenario | None] | None = None
    """Runs after the upstream is up and before the proxies start: may start extra
    services with ``ctx.processes`` and return a replacement scenario (use
    ``dataclasses.replace``) carrying values only known at run time."""


@dataclass
class ScenarioContext:
    """What a scenario's ``prepare`` hook gets."""

    scenario: Scenario
    workdir: Path
    """A directory of its own for config files and data."""
    start: Callable[..., Proc]
    """``start(name, argv, *, cpu, stop_timeout=10.0, env=None)``: start an extra service
    (see :meth:`ProcessGroup.start`); it is stopped with the scenario's servers. Use
    :func:`wait_for_port` to wait for it."""
    ports: PortAllocator
    upstream_ports: list[int]
    tools: dict[str, str]


def _bench_redis(ctx: ScenarioContext) -> str:
    """A Redis of the benchmark's own, pinned with the load (so that the proxy has
    its CPU to itself, as in every other scenario); the machine's Redis on 6379 when
    there is no redis-server to start."""
    server = shutil.which("redis-server")
    if server is None:
        print("auth: no redis-server; using the Redis on 127.0.0.1:6379", file=sys.stderr)
        return "redis://127.0.0.1:6379/0"
    (port,) = ctx.ports.take()
    argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    proc = ctx.start("redis", [*argv, "no", "--dir", str(ctx.workdir)], cpu=LOAD_CPU)
    wait_for_port(proc, port)
    return f"redis://127.0.0.1:{port}/0"


def _prepare_auth(ctx: ScenarioContext) -> Scenario:
    """An RS256 key pair and a long-lived token for the ``auth`` scenario."""
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    token = jwt.encode(
        {"sub": "bench-user", "exp": int(time.time()) + 86400, "scope": "bench"},
        key,
        algorithm="RS256",
    )
    route = {
        "auth": {
            "jwt": {
                "algorithms": ["RS256"],
                "keys": [{"pem": public}],
                "forward_claims": {"sub": "X-User-Id"},
            },
            "scopes": ["bench"],
        },
        "rate_limit": {
            # Far above what one core can do: every request is counted in Redis,
            # none is refused.
            "rate": "10000000/s",
            "burst": 1000000,
            "by": "consumer",
            "redis": _bench_redis(ctx),
            "key_prefix": f"meshgate-bench-{os.getpid()}",
        },
    }
    return dataclasses.replace(
        ctx.scenario,
        meshgate_route=route,
        headers={"Authorization": f"Bearer {token}"},
    )


def _prepare_tracing(ratio: float) -> Callable[[ScenarioContext], Scenario]:
    """Tracing at ``ratio``, exporting OTLP to the upstream nginx (which answers every
    export with 200 on its ``/v1/traces`` location, off the proxy's CPU)."""

    def prepare(ctx: ScenarioContext) -> Scenario:
        endpoint = f"http://127.0.0.1:{ctx.upstream_ports[0]}"
        tracing = {"endpoint": endpoint, "ratio": ratio}
        return dataclasses.replace(ctx.scenario, meshgate_gateway={"tracing": tracing})

    return prepare


def _prepare_logs(ctx: ScenarioContext) -> Scenario:
    """Access logs on, to files: nginx's buffered (64 KiB, flushed every second, as
    production setups write it), meshgate's written by its worker's thread in batches."""
    nginx_log = ctx.workdir / "nginx-access.log"
    meshgate_log = ctx.workdir / "meshgate-access.log"
    return dataclasses.replace(
        ctx.scenario,
        nginx_location=f"access_log {nginx_log} buffer=64k flush=1s;",
        meshgate_gateway={"access_log": {"enabled": True, "path": str(meshgate_log)}},
    )


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("basic", "one upstream, one catch-all route, defaults otherwise"),
        Scenario(
            "three",
            "three upstream instances balanced round robin (direct hits the first one)",
            upstreams=3,
            meshgate_upstream={"balancer": "round_robin"},
        ),
        Scenario(
            "p2c",
            "three upstream instances; meshgate: power of two choices (least request over "
            "an EWMA of latency) with passive health; HAProxy: random(2); nginx: round "
            "robin, its fastest here (its 'random two least_conn' measured 2.5x slower, "
            "which would flatter the ratio)",
            upstreams=3,
            meshgate_upstream={
                "balancer": "least_request",
                "health": {"passive": {"consecutive_failures": 5}},
            },
            haproxy_balance="random(2)",
        ),
        Scenario(
            "auth",
            "meshgate verifies a JWT (RS256) and counts every request in Redis (GCRA, "
            "one round trip); nginx and HAProxy proxy plainly: the ratio is against "
            "plain nginx",
            prepare=_prepare_auth,
        ),
        Scenario(
            "logs",
            "basic, with the access log on (to a file) in nginx and meshgate; compare with "
            "basic in the same run for what logging costs",
            prepare=_prepare_logs,
        ),
        Scenario(
            "trace1",
            "basic, with tracing at 1 % (OTLP export to the upstream nginx, which "
            "answers 200); nginx and HAProxy proxy plainly",
            prepare=_prepare_tracing(0.01),
        ),
        Scenario(
            "trace100",
            "basic, with every request traced (two spans each, exported as OTLP)",
            prepare=_prepare_tracing(1.0),
        ),
    )
}


# ------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after ``comm``; field N of proc(5) is at N - 3."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


_PPID, _UTIME, _STIME, _CUTIME, _CSTIME, _STARTTIME = 1, 11, 12, 13, 14, 19


def _start_time(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return int(stat[_STARTTIME]) if stat else None


def _alive_same(pid: int, start: int) -> bool:
    """Whether ``pid`` is still the process that started at ``start`` and not a zombie."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z" and int(stat[_STARTTIME]) == start


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants (found by scanning /proc for parent pids)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := _proc_stat(int(name))) is not None:
            children.setdefault(int(stat[_PPID]), []).append(int(name))
    tree: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used so far by ``root``'s process tree (user + system, with reaped
    children counted through their parent's cutime/cstime)."""
    ticks = 0
    for pid in process_tree(root):
        stat = _proc_stat(pid)
        if stat is not None:
            ticks += sum(int(stat[i]) for i in (_UTIME, _STIME, _CUTIME, _CSTIME))
    return ticks / CLK_TCK


@dataclass
class Proc:
    """A server process the benchmark started, with its combined stdout/stderr log."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    stop_timeout: float

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(cannot read {self.log_path}: {exc.strerror})"
        tail = text.splitlines()[-lines:]
        return "\n".join(f"    {line}" for line in tail) if tail else "    (empty)"

    def describe_exit(self) -> str:
        return (
            f"{self.name} (pid {self.pid}) exited with code {self.popen.returncode}; "
            f"last lines of {self.log_path}:\n{self.log_tail()}"
        )


class ProcessGroup:
    """Starts servers (optionally pinned to a CPU) and stops them by pid."""

    def __init__(self, workdir: Path, taskset: str) -> None:
        self.workdir = workdir
        self.taskset = taskset
        self._procs: list[Proc] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpu: int | None,
        stop_timeout: float = STOP_TIMEOUT,
        env: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
    ) -> Proc:
        """Start ``argv`` in its own session (so Ctrl-C reaches only the benchmark,
        which then stops it in order), logging to ``<log_dir or workdir>/<name>.log``."""
        log_path = (log_dir or self.workdir) / f"{name}.log"
        command = [self.taskset, "-c", str(cpu), *argv] if cpu is not None else list(argv)
        with log_path.open("wb") as log_file:
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
                env=None if env is None else {**os.environ, **env},
            )
        proc = Proc(name, popen, log_path, stop_timeout)
        self._procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        """SIGTERM, wait, SIGKILL if needed; then SIGKILL any descendant left behind."""
        if proc in self._procs:
            self._procs.remove(proc)
        if not proc.alive():
            return
        descendants = [
            (pid, start)
            for pid in process_tree(proc.pid)[1:]
            if (start := _start_time(pid)) is not None
        ]
        proc.popen.send_signal(signal.SIGTERM)
        try:
            proc.popen.wait(timeout=proc.stop_timeout)
        except subprocess.TimeoutExpired:
            log(f"{proc.name} (pid {proc.pid}) did not stop in {proc.stop_timeout:g}s; killing it")
            proc.popen.kill()
            proc.popen.wait()
        # children may take a moment after their parent (e.g. multiprocessing's
        # resource tracker exits once it sees the supervisor's pipe close)
        deadline = time.monotonic() + 3.0
        while True:
            left = [(pid, start) for pid, start in descendants if _alive_same(pid, start)]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for pid, _ in left:
            log(f"{proc.name}: killing leftover child pid {pid}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for proc in reversed(list(self._procs)):
            try:
                self.stop(proc)
            except Exception as exc:
                log(f"could not stop {proc.name} (pid {proc.pid}): {exc}")


class PortAllocator:
    """Free loopback ports (bind port 0, read it, close), never the same one twice."""

    def __init__(self) -> None:
        self._used: set[int] = set()

    def take(self, count: int = 1) -> list[int]:
        ports: list[int] = []
        with contextlib.ExitStack() as stack:
            while len(ports) < count:
                sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
                if port not in self._used:
                    self._used.add(port)
                    ports.append(port)
        return ports

    def one(self) -> int:
        return self.take(1)[0]


def wait_for_port(proc: Proc, port: int, timeout: float = START_TIMEOUT) -> None:
    """Return once 127.0.0.1:port accepts a TCP connection; fail if ``proc`` dies."""
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise BenchError(f"{proc.describe_exit()}\n(it never listened on port {port})")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        if time.monotonic() > deadline:
            raise BenchError(
                f"{proc.name} (pid {proc.pid}) did not accept connections on "
                f"127.0.0.1:{port} within {timeout:g}s; last lines of {proc.log_path}:\n"
                f"{proc.log_tail()}"
            )
        time.sleep(0.05)


def wait_for_log(proc: Proc, needle: str, timeout: float = START_TIMEOUT) -> None:
    """Return once ``needle`` appears in the process's log; fail if it dies first."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            if needle in proc.log_path.read_text(errors="replace"):
                return
        if not proc.alive():
            raise BenchError(f"{proc.describe_exit()}\n(it never printed {needle!r})")
        if time.monotonic() > deadline:
            raise BenchError(
                f"{proc.name} (pid {proc.pid}) did not print {needle!r} within {timeout:g}s; "
                f"last lines of {proc.log_path}:\n{proc.log_tail()}"
            )
        time.sleep(0.05)


# ----------------------------------------------------------------------------- tools


def find_tool(name: str) -> str | None:
    """``name`` on PATH, or in the sbin directories a non-root PATH may lack."""
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def ensure_tools() -> dict[str, str]:
    """Paths of nginx, haproxy, wrk and taskset; apt-get installs the missing ones."""
    missing = [name for name in TOOLS if find_tool(name) is None]
    if missing:
        packages = sorted({TOOLS[name] for name in missing})
        if shutil.which("apt-get") is None:
            raise BenchError(f"{', '.join(missing)} missing and no apt-get; install them")
        prefix = ["env", "DEBIAN_FRONTEND=noninteractive"]
        if os.geteuid() != 0:
            sudo = shutil.which("sudo")
            if sudo is None:
                raise BenchError(
                    f"{', '.join(missing)} missing; run as root or install them: "
                    f"apt-get install -y {' '.join(packages)}"
                )
            prefix = [sudo, *prefix]
        log(f"installing {' '.join(packages)} with apt-get")
        for argv in (
            [*prefix, "apt-get", "update"],
            [*prefix, "apt-get", "install", "-y", *packages],
        ):
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                output = (done.stdout + done.stderr).strip().splitlines()[-20:]
                raise BenchError(
                    f"{' '.join(argv)} failed (exit {done.returncode}):\n" + "\n".join(output)
                )
    paths: dict[str, str] = {}
    for name, package in TOOLS.items():
        path = find_tool(name)
        if path is None:
            raise BenchError(f"{name} is still missing after apt-get install {package}")
        paths[name] = path
    return paths


def check_environment(targets: Sequence[str]) -> None:
    cpus = os.sched_getaffinity(0)
    if not {PROXY_CPU, LOAD_CPU} <= cpus:
        raise BenchError(
            f"needs CPUs {PROXY_CPU} and {LOAD_CPU} (proxy and load side); "
            f"this process may use {sorted(cpus)}"
        )
    if "meshgate" in targets and importlib.util.find_spec("meshgate") is None:
        raise BenchError(
            f"{sys.executable} cannot import meshgate; run the benchmark with the project "
            "venv: .venv/bin/python bench/gateway.py (or make bench)"
        )


def _first_line(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    return lines[0] if lines else "unknown"


def machine_info(tools: Mapping[str, str]) -> dict[str, Any]:
    uname = os.uname()
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    try:
        status = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        src_modified: bool | None = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        src_modified = None
    return {
        "nproc": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "kernel": uname.release,
        "os": f"{uname.sysname} {uname.machine}",
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "nginx": _first_line([tools["nginx"], "-v"]),
        "haproxy": _first_line([tools["haproxy"], "-v"]),
        "wrk": _first_line([tools["wrk"], "-v"]).split(" Copyright")[0],
        "meshgate": _first_line([sys.executable, "-m", "meshgate", "version"]),
        "meshgate_commit": _first_line(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"]),
        "meshgate_src_modified": src_modified,  # uncommitted changes under src/
    }


# ----------------------------------------------------------------------- configs


def deep_merge(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``overlay``; nested mappings merge, anything else replaces."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _yaml_key(key: object) -> str:
    text = str(key)
    return text if re.fullmatch(r"[A-Za-z_][\w.-]*", text) else json.dumps(text)


def _yaml_nested(value: object) -> bool:
    if isinstance(value, Mapping):
        return bool(value)
    if isinstance(value, list | tuple):
        return any(isinstance(item, Mapping | list | tuple) for item in value)
    return False


def _yaml_lines(value: object, indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            if _yaml_nested(item):
                lines.append(f"{pad}{_yaml_key(key)}:")
                lines.extend(_yaml_lines(item, indent + 2))
            else:
                lines.append(f"{pad}{_yaml_key(key)}: {json.dumps(item)}")
    elif isinstance(value, list | tuple):
        for item in value:
            if _yaml_nested(item):
                first, *rest = _yaml_lines(item, indent + 2)
                lines.append(f"{pad}- {first.lstrip()}")
                lines.extend(rest)
            else:
                lines.append(f"{pad}- {json.dumps(item)}")
    else:
        lines.append(f"{pad}{json.dumps(value)}")
    return lines


def to_yaml(document: Mapping[str, Any]) -> str:
    """Block-style YAML; scalars and flat lists are written as JSON (valid YAML)."""
    return "\n".join(_yaml_lines(document, 0)) + "\n"


def write_docroot(directory: Path) -> dict[str, bytes]:
    """The static files the upstream serves: one per body size, deterministic content."""
    directory.mkdir(parents=True, exist_ok=True)
    bodies: dict[str, bytes] = {}
    for name, size in SIZES.items():
        pattern = b"meshgate benchmark body 0123456789abcdefghijklmnopqrstuvwxyz\n"
        body = (pattern * (size // len(pattern) + 1))[:size]
        (directory / name).write_bytes(body)
        bodies[name] = body
    return bodies


def _nginx_common(workdir: Path, name: str) -> str:
    """Main-context lines every nginx of ours shares: foreground, own pid and logs."""
    user = ""
    if os.geteuid() == 0:  # root's workers would otherwise run as "nobody" (no such group)
        user = f"user {pwd.getpwuid(0).pw_name} {grp.getgrgid(os.getegid()).gr_name};"
    return f"""worker_processes 1;
daemon off;
master_process on;
pid {workdir}/{name}.pid;
error_log {workdir}/{name}-error.log warn;
{user}
events {{ worker_connections 4096; }}
"""


def _nginx_temp_paths(workdir: Path, name: str) -> str:
    base = workdir / f"{name}-temp"
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    return "\n".join(f"    {kind}_temp_path {base}/{kind};" for kind in kinds)


def nginx_argv(nginx: str, workdir: Path, name: str, conf: Path) -> list[str]:
    prefix = workdir / f"{name}-prefix"
    prefix.mkdir(exist_ok=True)
    (workdir / f"{name}-temp").mkdir(exist_ok=True)  # nginx creates only the last level
    error_log = workdir / f"{name}-error.log"
    return [nginx, "-e", str(error_log), "-p", f"{prefix}/", "-c", str(conf)]


def upstream_nginx_conf(workdir: Path, ports: Sequence[int], docroot: Path) -> str:
    servers = "\n".join(
        f"    server {{ listen 127.0.0.1:{port}; root {docroot}; location / {{ }}"
        # An OTLP sink for the tracing scenarios: it takes any export and answers 200.
        " location = /v1/traces { client_body_buffer_size 1m; return 200; } }"
        for port in ports
    )
    return f"""# the upstream: static files, as cheap per request as nginx gets
{_nginx_common(workdir, "upstream")}
http {{
    access_log off;
{_nginx_temp_paths(workdir, "upstream")}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    open_file_cache max=64 inactive=300s;
{servers}
}}
"""


def proxy_nginx_conf(
    workdir: Path, scenario: Scenario, port: int, upstream_ports: Sequence[int]
) -> str:
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in upstream_ports)
    return f"""# nginx as the reference reverse proxy
{_nginx_common(workdir, "nginx")}
http {{
    access_log off;
{_nginx_temp_paths(workdir, "nginx")}
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    upstream up {{
{servers}
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
        {scenario.nginx_upstream}
    }}
    {scenario.nginx_http}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering on;
            proxy_buffer_size 16k;
            proxy_buffers 32 16k;
            proxy_busy_buffers_size 64k;
            proxy_max_temp_file_size 0;
            {scenario.nginx_location}
        }}
    }}
}}
"""


def haproxy_cfg(scenario: Scenario, port: int, upstream_ports: Sequence[int]) -> str:
    servers = "\n".join(
        f"    server s{i} 127.0.0.1:{p}" for i, p in enumerate(upstream_ports, start=1)
    )
    return f"""# HAProxy as a reverse proxy; no logging
global
    nbthread 1
    maxconn 4096
    {scenario.haproxy_global}

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 30s
    timeout http-keep-alive 300s

frontend fe
    bind 127.0.0.1:{port}
    default_backend be
    {scenario.haproxy_frontend}

backend be
    balance {scenario.haproxy_balance}
    {scenario.haproxy_backend}
{servers}
"""


def meshgate_config(
    scenario: Scenario, port: int, admin_port: int, token: str, upstream_ports: Sequence[int]
) -> dict[str, Any]:
    gateway = deep_merge(
        {
            "listen": f"127.0.0.1:{port}",
            "workers": 1,
            "admin": {"listen": f"127.0.0.1:{admin_port}", "token": token},
            "access_log": {"enabled": False},
        },
        scenario.meshgate_gateway,
    )
    upstream = deep_merge(
        {"endpoints": [f"127.0.0.1:{p}" for p in upstream_ports]}, scenario.meshgate_upstream
    )
    route = deep_merge({"name": "bench", "upstream": "up"}, scenario.meshgate_route)
    return deep_merge(
        {"gateway": gateway, "upstreams": {"up": upstream}, "routes": [route]},
        scenario.meshgate_config,
    )


# --------------------------------------------------------------------------- wrk


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    non2xx: int
    connect_errors: int
    read_errors: int
    write_errors: int
    timeouts: int

    @property
    def errors(self) -> int:
        return (
            self.non2xx + self.connect_errors + self.read_errors + self.write_errors + self.timeouts
        )


_TIME = r"([\d.]+)(us|ms|s|m|h)"
_MS_PER_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def parse_wrk(text: str) -> WrkResult:
    """The numbers of a ``wrk --latency`` report (times converted to ms)."""
    total = re.search(rf"^\s*(\d+) requests in {_TIME}", text, re.MULTILINE)
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.MULTILINE)
    if total is None or rate is None:
        raise BenchError(f"cannot parse the wrk output:\n{text}")
    percentiles = {
        pct: float(number) * _MS_PER_UNIT[unit]
        for pct, number, unit in re.findall(rf"^\s+(50|99)%\s+{_TIME}\s*$", text, re.MULTILINE)
    }
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    connect, read, write, timeout = (int(n) for n in sock.groups()) if sock else (0, 0, 0, 0)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(
        requests=int(total.group(1)),
        seconds=float(total.group(2)) * _MS_PER_UNIT[total.group(3)] / 1000.0,
        rps=float(rate.group(1)),
        p50_ms=percentiles.get("50"),
        p99_ms=percentiles.get("99"),
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        connect_errors=connect,
        read_errors=read,
        write_errors=write,
        timeouts=timeout,
    )


def run_wrk(
    tools: Mapping[str, str],
    url: str,
    *,
    connections: int,
    duration: float,
    headers: Mapping[str, str],
    timeout: float,
    script: Path | None = None,
) -> tuple[WrkResult, str, float]:
    """Run wrk on the load CPU; return its numbers, its report and its CPU seconds."""
    argv = [tools["taskset"], "-c", str(LOAD_CPU), tools["wrk"], "-t1", f"-c{connections}"]
    argv += [f"-d{duration:g}s", f"--timeout={timeout:g}s", "--latency"]
    if script is not None:
        argv += ["-s", str(script)]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=duration + 60, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish in {duration + 60:g}s: {' '.join(argv)}") from None
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if done.returncode != 0:
        raise BenchError(
            f"wrk failed (exit {done.returncode}): {' '.join(argv)}\n{done.stdout}{done.stderr}"
        )
    return parse_wrk(done.stdout), done.stdout, cpu


# ----------------------------------------------------------------------- results


@dataclass
class Run:
    """One measured wrk run."""

    scenario: str
    body: str
    target: str
    rep: int
    url: str
    connections: int
    seconds: float
    requests: int
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int
    non2xx: int
    connect_errors: int
    read_errors: int
    write_errors: int
    timeouts: int
    proxy_cpu_s: float | None
    """None for ``direct`` (no proxy)."""
    proxy_cpu_pct: float | None
    """proxy_cpu_s / window_s: near 100 means the proxy was the limit."""
    window_s: float
    """Wall time between the CPU readings before and after wrk (a bit over ``seconds``)."""
    upstream_cpu_s: float
    wrk_cpu_s: float
    cpu1_busy_pct: float
    """(upstream + wrk CPU) / run time: near 100 means the load side was the limit."""
    req_per_cpu_s: float | None
    eff_vs_nginx: float | None = None
    rps_vs_nginx: float | None = None
    wrk_output: str = ""


@dataclass
class Row:
    """Medians over reps for one scenario, body and target."""

    scenario: str
    body: str
    target: str
    reps: int
    rps: float | None
    p50_ms: float | None
    p99_ms: float | None
    errors: int
    """Summed over reps, not a median."""
    proxy_cpu_s: float | None
    proxy_cpu_pct: float | None
    upstream_cpu_s: float | None
    cpu1_busy_pct: float | None
    req_per_cpu_s: float | None
    eff_vs_nginx: float | None
    rps_vs_nginx: float | None


def pair_with_reference(runs: Sequence[Run]) -> None:
    """Fill each run's ratios from the reference run of the same scenario, body and rep."""
    reference = {(r.scenario, r.body, r.rep): r for r in runs if r.target == REFERENCE}
    for run in runs:
        ref = reference.get((run.scenario, run.body, run.rep))
        if ref is None:
            continue
        if run.req_per_cpu_s and ref.req_per_cpu_s:
            run.eff_vs_nginx = run.req_per_cpu_s / ref.req_per_cpu_s
        if ref.rps:
            run.rps_vs_nginx = run.rps / ref.rps


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(runs: Sequence[Run]) -> list[Row]:
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.scenario, run.body, run.target), []).append(run)
    return [
        Row(
            scenario=scenario,
            body=body,
            target=target,
            reps=len(group),
            rps=_median(r.rps for r in group),
            p50_ms=_median(r.p50_ms for r in group),
            p99_ms=_median(r.p99_ms for r in group),
            errors=sum(r.errors for r in group),
            proxy_cpu_s=_median(r.proxy_cpu_s for r in group),
            proxy_cpu_pct=_median(r.proxy_cpu_pct for r in group),
            upstream_cpu_s=_median(r.upstream_cpu_s for r in group),
            cpu1_busy_pct=_median(r.cpu1_busy_pct for r in group),
            req_per_cpu_s=_median(r.req_per_cpu_s for r in group),
            eff_vs_nginx=_median(r.eff_vs_nginx for r in group),
            rps_vs_nginx=_median(r.rps_vs_nginx for r in group),
        )
        for (scenario, body, target), group in groups.items()
    ]


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(rows: Sequence[Row]) -> str:
    header = [
        "scenario",
        "body",
        "target",
        "req/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "proxy CPU s",
        "req/CPU-s",
        "eff vs nginx",
        "req/s vs nginx",
        "CPU1 busy",
    ]
    numeric = [False, False, False] + [True] * (len(header) - 3)
    cells = [
        [
            row.scenario,
            row.body,
            row.target,
            _fmt(row.rps, ",.0f"),
            _fmt(row.p50_ms, ".2f"),
            _fmt(row.p99_ms, ".2f"),
            str(row.errors),
            _fmt(row.proxy_cpu_s, ".2f"),
            _fmt(row.req_per_cpu_s, ",.0f"),
            _fmt(row.eff_vs_nginx, ".2f"),
            _fmt(row.rps_vs_nginx, ".2f"),
            _fmt(row.cpu1_busy_pct, ".0f", "%"),
        ]
        for row in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]

    def line(values: Sequence[str]) -> str:
        padded = (
            v.rjust(w) if right else v.ljust(w)
            for v, w, right in zip(values, widths, numeric, strict=True)
        )
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            "-" * (w + 1) + ":" if right else "-" * (w + 2)
            for w, right in zip(widths, numeric, strict=True)
        )
        + "|"
    )
    return "\n".join([line(header), rule, *(line(c) for c in cells)])


# ------------------------------------------------------------------------ driver


@dataclass
class Options:
    duration: float
    warmup: float
    reps: int
    connections: int
    connections_large: int
    sizes: list[str]
    targets: list[str]
    scenarios: list[str]
    wrk_timeout: float
    json_path: Path | None
    keep: bool
    paced: float | None = None
    """Requests per second offered in all (wrk paced by a Lua delay), or None: as fast
    as the proxy answers."""


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore http_proxy


def fetch(url: str, headers: Mapping[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=dict(headers))  # noqa: S310 - http://127.0.0.1 only
    try:
        with _OPENER.open(request, timeout=15) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class ScenarioRunner:
    """Starts one scenario's servers, checks them, warms up, measures, stops them."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        opts: Options,
        tools: dict[str, str],
        processes: ProcessGroup,
        ports: PortAllocator,
        workdir: Path,
        docroot: Path,
        bodies: Mapping[str, bytes],
        runs: list[Run],
        configs: dict[str, dict[str, str]],
    ) -> None:
        self.scenario = scenario
        self.opts = opts
        self.tools = tools
        self.processes = processes
        self.ports = ports
        self.workdir = workdir / scenario.name
        self.workdir.mkdir()
        self.docroot = docroot
        self.bodies = bodies
        self.runs = runs
        self.configs = configs.setdefault(scenario.name, {})
        self.started: list[Proc] = []
        self.upstream: Proc | None = None
        self.endpoints: dict[str, tuple[Proc | None, int]] = {}  # target -> (proxy, port)

    def run(self) -> None:
        try:
            self.start_servers()
            self.check()
            self.warmup()
            self.measure()
        finally:
            for proc in reversed(self.started):
                self.processes.stop(proc)

    def _start(self, name: str, argv: Sequence[str], cpu: int, stop_timeout: float) -> Proc:
        proc = self.processes.start(
            name, argv, cpu=cpu, stop_timeout=stop_timeout, log_dir=self.workdir
        )
        self.started.append(proc)
        return proc

    def _start_extra(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpu: int | None,
        stop_timeout: float = STOP_TIMEOUT,
        env: Mapping[str, str] | None = None,
    ) -> Proc:
        proc = self.processes.start(
            name, argv, cpu=cpu, stop_timeout=stop_timeout, env=env, log_dir=self.workdir
        )
        self.started.append(proc)
        return proc

    def _write(self, name: str, text: str, *, record: str | None = None) -> Path:
        path = self.workdir / name
        path.write_text(text)
        self.configs[name] = record if record is not None else text
        return path

    def start_servers(self) -> None:
        scenario, wd, tools = self.scenario, self.workdir, self.tools
        upstream_ports = self.ports.take(scenario.upstreams)
        conf = self._write(
            "upstream-nginx.conf", upstream_nginx_conf(wd, upstream_ports, self.docroot)
        )
        self.upstream = self._start(
            "upstream", nginx_argv(tools["nginx"], wd, "upstream", conf), LOAD_CPU, STOP_TIMEOUT
        )
        for port in upstream_ports:
            wait_for_port(self.upstream, port)
        self.endpoints["direct"] = (None, upstream_ports[0])
        if scenario.prepare is not None:
            context = ScenarioContext(
                scenario, wd, self._start_extra, self.ports, upstream_ports, tools
            )
            scenario = self.scenario = scenario.prepare(context) or scenario

        targets = self.opts.targets
        if "nginx" in targets:
            port = self.ports.one()
            conf = self._write(
                "nginx-proxy.conf", proxy_nginx_conf(wd, scenario, port, upstream_ports)
            )
            proc = self._start(
                "nginx", nginx_argv(tools["nginx"], wd, "nginx", conf), PROXY_CPU, STOP_TIMEOUT
            )
            wait_for_port(proc, port)
            self.endpoints["nginx"] = (proc, port)
        if "haproxy" in targets:
            port = self.ports.one()
            cfg = self._write("haproxy.cfg", haproxy_cfg(scenario, port, upstream_ports))
            proc = self._start(
                "haproxy", [tools["haproxy"], "-f", str(cfg), "-db"], PROXY_CPU, STOP_TIMEOUT
            )
            wait_for_port(proc, port)
            self.endpoints["haproxy"] = (proc, port)
        if "meshgate" in targets:
            port, admin_port = self.ports.take(2)
            token = secrets.token_hex(16)
            document = meshgate_config(scenario, port, admin_port, token, upstream_ports)
            text = to_yaml(document)
            cfg = self._write(
                "meshgate.yaml", text, record=text.replace(token, "<random 32-char token>")
            )
            cfg.chmod(0o600)
            argv = [sys.executable, "-m", "meshgate", "gateway", str(cfg)]
            argv += ["--workers", "1", "--log-level", "warning"]
            proc = self._start("meshgate", argv, PROXY_CPU, MESHGATE_STOP_TIMEOUT)
            wait_for_log(proc, "gateway on http://", START_TIMEOUT + 30)
            wait_for_port(proc, port)
            self.endpoints["meshgate"] = (proc, port)
        log(
            f"[{scenario.name}] servers up: "
            + ", ".join(
                f"{t}=:{port}" + (f" (pid {p.pid})" if p else "")
                for t, (p, port) in self.endpoints.items()
            )
            + f"; upstream pid {self.upstream.pid} on {upstream_ports}"
        )

    def url(self, target: str, body: str) -> str:
        return f"http://127.0.0.1:{self.endpoints[target][1]}/{body}"

    def connections(self, body: str) -> int:
        large = SIZES[body] >= LARGE_BODY
        return self.opts.connections_large if large else self.opts.connections

    def check(self) -> None:
        """Every target answers 200 with the exact file, once per upstream instance."""
        for target in self.opts.targets:
            for body in self.opts.sizes:
                url = self.url(target, body)
                for _ in range(self.scenario.upstreams):
                    try:
                        status, data = fetch(url, self.scenario.headers)
                    except (OSError, urllib.error.URLError) as exc:
                        raise BenchError(f"pre-flight GET {url} ({target}) failed: {exc}") from None
                    if status != 200 or data != self.bodies[body]:
                        raise BenchError(
                            f"pre-flight GET {url} ({target}): status {status}, "
                            f"{len(data)} bytes; expected 200 and {len(self.bodies[body])} bytes"
                            f" (first bytes: {data[:200]!r})"
                        )
        log(f"[{self.scenario.name}] pre-flight ok: every target serves every body")

    def warmup(self) -> None:
        if self.opts.warmup <= 0:
            return
        for body in self.opts.sizes:
            for target in self.opts.targets:
                result, _, _ = self._wrk(target, body, self.opts.warmup)
                self._check_alive(target)
                if result.errors:
                    log(f"[{self.scenario.name}] warmup {body} {target}: {result.errors} errors")
        log(f"[{self.scenario.name}] warmup done ({self.opts.warmup:g}s per body and target)")

    def _wrk(self, target: str, body: str, duration: float) -> tuple[WrkResult, str, float]:
        try:
            return run_wrk(
                self.tools,
                self.url(target, body),
                connections=self.connections(body),
                duration=duration,
                headers=self.scenario.headers,
                timeout=self.opts.wrk_timeout,
                script=self._pacing(body),
            )
        except BenchError:
            self._check_alive(target)  # a dead server explains it better than wrk does
            raise

    def _pacing(self, body: str) -> Path | None:
        """A wrk script that waits between a connection's requests so that all of them
        together offer ``--paced`` requests per second (while answers take less time than
        the pause, which is the point: latency at a rate every target sustains)."""
        rate = self.opts.paced
        if rate is None:
            return None
        pause_ms = self.connections(body) / rate * 1000
        path = self.workdir / f"paced-{body}.lua"
        path.write_text(f"function delay()\n  return {pause_ms:.3f}\nend\n")
        return path

    def _check_alive(self, target: str) -> None:
        for proc in (self.upstream, self.endpoints[target][0]):
            if proc is not None and not proc.alive():
                raise BenchError(f"{proc.describe_exit()}\n(it died while wrk ran)")

    def measure(self) -> None:
        opts = self.opts
        for rep in range(1, opts.reps + 1):
            for body in opts.sizes:
                for target in opts.targets:
                    run = self.measure_one(target, body, rep)
                    self.runs.append(run)
                    log(
                        f"[{self.scenario.name} rep {rep}/{opts.reps}] {body:>4} {target:<8} "
                        f"{run.rps:>10,.0f} req/s  p99 {_fmt(run.p99_ms, '.2f')} ms  "
                        f"proxy CPU {_fmt(run.proxy_cpu_s, '.2f')} s  "
                        f"req/CPU-s {_fmt(run.req_per_cpu_s, ',.0f')}  errors {run.errors}"
                    )

    def measure_one(self, target: str, body: str, rep: int) -> Run:
        assert self.upstream is not None  # noqa: S101 - set by start_servers
        proxy = self.endpoints[target][0]
        url = self.url(target, body)
        connections = self.connections(body)
        window_start = time.monotonic()
        proxy_before = tree_cpu_seconds(proxy.pid) if proxy else None
        upstream_before = tree_cpu_seconds(self.upstream.pid)
        result, output, wrk_cpu = self._wrk(target, body, self.opts.duration)
        upstream_cpu = tree_cpu_seconds(self.upstream.pid) - upstream_before
        proxy_cpu = (
            tree_cpu_seconds(proxy.pid) - proxy_before
            if proxy and proxy_before is not None
            else None
        )
        window = time.monotonic() - window_start
        self._check_alive(target)
        seconds = result.seconds or self.opts.duration
        return Run(
            scenario=self.scenario.name,
            body=body,
            target=target,
            rep=rep,
            url=url,
            connections=connections,
            seconds=seconds,
            requests=result.requests,
            rps=result.rps,
            p50_ms=result.p50_ms,
            p99_ms=result.p99_ms,
            errors=result.errors,
            non2xx=result.non2xx,
            connect_errors=result.connect_errors,
            read_errors=result.read_errors,
            write_errors=result.write_errors,
            timeouts=result.timeouts,
            proxy_cpu_s=proxy_cpu,
            proxy_cpu_pct=100.0 * proxy_cpu / window if proxy_cpu is not None else None,
            window_s=window,
            upstream_cpu_s=upstream_cpu,
            wrk_cpu_s=wrk_cpu,
            cpu1_busy_pct=100.0 * (upstream_cpu + wrk_cpu) / seconds,
            req_per_cpu_s=result.requests / proxy_cpu if proxy_cpu else None,
            wrk_output=output,
        )


def _csv(
    value: str, allowed: Sequence[str], option: str, parser: argparse.ArgumentParser
) -> list[str]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    for item in items:
        if item not in allowed:
            parser.error(f"{option}: unknown {item!r}; choose from {', '.join(allowed)}")
    if not items:
        parser.error(f"{option}: give at least one of {', '.join(allowed)}")
    return [item for item in allowed if item in items]  # canonical order, no duplicates


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        description="Benchmark meshgate against nginx and HAProxy (run with the project venv).",
        epilog="scenarios: " + "; ".join(f"{s.name}: {s.description}" for s in SCENARIOS.values()),
    )
    parser.add_argument("--duration", type=float, help="seconds per measured run (default 10)")
    parser.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="unrecorded seconds per body and target before the first rep (default 2; 0: none)",
    )
    parser.add_argument("--reps", type=int, help="interleaved repetitions (default 3)")
    parser.add_argument(
        "--connections", type=int, default=50, help="wrk connections for 100b and 10k (50)"
    )
    parser.add_argument(
        "--connections-large", type=int, default=10, help="wrk connections for 1m (10)"
    )
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma list of 100b,10k,1m")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma list of targets")
    parser.add_argument(
        "--scenarios", default="basic", help=f"comma list of {','.join(SCENARIOS)} (basic)"
    )
    parser.add_argument("--quick", action="store_true", help="3 s runs, one rep")
    parser.add_argument(
        "--wrk-timeout", type=float, default=2.0, help="wrk's socket timeout in seconds (2)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="where to write the results (default bench/results/gateway-<UTC>.json)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    parser.add_argument(
        "--paced",
        type=float,
        metavar="RPS",
        help="offer this many requests per second in all (paced wrk) instead of as many as "
        "the proxy takes: compare p99 latency at one rate",
    )
    ns = parser.parse_args(argv)
    duration = ns.duration if ns.duration is not None else (3.0 if ns.quick else 10.0)
    reps = ns.reps if ns.reps is not None else (1 if ns.quick else 3)
    if duration <= 0 or reps < 1 or ns.connections < 1 or ns.connections_large < 1:
        parser.error("--duration, --reps and the connection counts must be positive")
    return Options(
        duration=duration,
        warmup=ns.warmup,
        reps=reps,
        connections=ns.connections,
        connections_large=ns.connections_large,
        sizes=_csv(ns.sizes, list(SIZES), "--sizes", parser),
        targets=_csv(ns.targets, TARGETS, "--targets", parser),
        scenarios=_csv(ns.scenarios, list(SCENARIOS), "--scenarios", parser),
        wrk_timeout=ns.wrk_timeout,
        json_path=ns.json,
        keep=ns.keep,
        paced=ns.paced,
    )


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _utc(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # stop our servers on SIGTERM as on Ctrl-C
    started = dt.datetime.now(dt.UTC)
    try:
        tools = ensure_tools()
        check_environment(opts.targets)
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    machine = machine_info(tools)
    log(
        f"meshgate {machine['meshgate']} @ {machine['meshgate_commit'][:12]}; "
        f"{machine['nginx']}; {machine['haproxy']}; {machine['wrk']}"
    )
    workdir = Path(tempfile.mkdtemp(prefix="meshgate-bench-"))
    processes = ProcessGroup(workdir, tools["taskset"])
    ports = PortAllocator()
    runs: list[Run] = []
    configs: dict[str, dict[str, str]] = {}
    status, error = "ok", None
    try:
        bodies = write_docroot(workdir / "www")
        for name in opts.scenarios:
            runner = ScenarioRunner(
                SCENARIOS[name],
                opts=opts,
                tools=tools,
                processes=processes,
                ports=ports,
                workdir=workdir,
                docroot=workdir / "www",
                bodies=bodies,
                runs=runs,
                configs=configs,
            )
            runner.run()
    except KeyboardInterrupt:
        status = "interrupted"
        log("interrupted; stopping the servers")
    except BenchError as exc:
        status, error = "failed", str(exc)
        log(f"error: {exc}")
        if not opts.keep:
            log("(the temp dir is removed; rerun with --keep to look at its configs and logs)")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        processes.stop_all()
        if opts.keep:
            log(f"kept configs and logs in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    if not runs:
        return 1
    pair_with_reference(runs)
    rows = summarize(runs)
    finished = dt.datetime.now(dt.UTC)
    json_path = opts.json_path or RESULTS_DIR / f"gateway-{started:%Y%m%dT%H%M%SZ}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "meshgate gateway vs nginx and haproxy",
        "status": status,
        "error": error,
        "started_utc": _utc(started),
        "finished_utc": _utc(finished),
        "command": [sys.executable, *sys.argv],
        "options": {
            k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(opts).items()
        },
        "machine": machine,
        "pinning": {"proxy_cpu": PROXY_CPU, "load_and_upstream_cpu": LOAD_CPU},
        "body_bytes": {name: SIZES[name] for name in opts.sizes},
        "scenarios": {
            name: {
                "description": SCENARIOS[name].description,
                "upstreams": SCENARIOS[name].upstreams,
                "configs": configs.get(name, {}),
            }
            for name in opts.scenarios
        },
        "medians": [dataclasses.asdict(row) for row in rows],
        "runs": [dataclasses.asdict(run) for run in runs],
    }
    json_path.write_text(json.dumps(report, indent=2) + "\n")

    reps_note = f"median of {opts.reps} reps" if opts.reps > 1 else "1 rep"
    print(
        f"\nmeshgate {machine['meshgate']} ({machine['meshgate_commit'][:12]}), "
        f"{opts.duration:g}s runs, {reps_note}, "
        f"{opts.connections}/{opts.connections_large} connections (small/1m bodies)"
    )
    if status != "ok":
        print(f"**{status}**: the table holds only the runs that completed")
    print()
    print(markdown_table(rows))
    print(
        "\nreq/CPU-s = requests / proxy CPU seconds; eff vs nginx = req/CPU-s / nginx's "
        "(paired per rep); CPU1 busy = (upstream + wrk CPU) / run time; errors summed over reps."
    )
    print(f"results: {json_path}")
    return 0 if status == "ok" else (130 if status == "interrupted" else 1)


if __name__ == "__main__":
    sys.exit(main())
