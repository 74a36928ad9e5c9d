"""``meshgate up`` end to end: real ``meshgate up`` processes in temporary folders,
running the shop (examples/shop/meshgate.yaml) and small systems of commands.

Every test checks by PID that nothing it started outlives it. The shop runs once
for the module (starting it costs seconds on two cores); its tests run in file
order and the last one stops it with Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from meshgate.cli import app
from tests.e2e.conftest import Pid, children, tail, wait_dead
from tests.venvs import Venv

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
SHOP = ROOT / "examples" / "shop"
READY_TIMEOUT = 60.0
"""How long ``up`` of a system may take to print that it is ready."""


# ---------------------------------------------------------------------------- helpers


def descendants(pid: int) -> set[Pid]:
    """Every live process below ``pid``, from /proc."""
    found: set[Pid] = set()
    todo = [pid]
    while todo:
        for child in children(todo.pop()):
            found.add(child)
            todo.append(child.pid)
    return found


def processes_with(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        pid = Pid.of(int(entry.name))
        if marker in cmdline and pid is not None and pid.alive():
            found.append(pid.pid)
    return found


@dataclass
class Up:
    """A running ``meshgate up`` and what it started."""

    folder: Path
    proc: subprocess.Popen[bytes]
    output: Path
    known: set[Pid] = field(default_factory=set)
    """Every process seen below it, checked at the end."""

    @property
    def file(self) -> Path:
        return self.folder / "meshgate.yaml"

    @property
    def state(self) -> Path:
        return self.folder / ".meshgate"

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_ready(self) -> float:
        """Wait for the ready line; the seconds ``up`` reported."""
        deadline = time.monotonic() + READY_TIMEOUT
        while (
            match := re.search(r"is ready: \d+ process(?:es)? in ([\d.]+) s", self.text())
        ) is None:
            if self.proc.poll() is not None:
                pytest.fail(f"meshgate up exited with {self.proc.returncode}:\n{self.text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"up not ready within {READY_TIMEOUT:g} s:\n{tail(self.output)}")
            time.sleep(0.05)
        self.snapshot()
        return float(match[1])

    def wait_for(self, pattern: str, timeout: float = 10) -> None:
        """Wait until the output has a line matching ``pattern``."""
        deadline = time.monotonic() + timeout
        while re.search(pattern, self.text(), re.M) is None:
            if time.monotonic() > deadline:
                pytest.fail(f"no line matches {pattern!r}:\n{tail(self.output)}")
            time.sleep(0.05)

    def snapshot(self) -> None:
        self.known |= descendants(self.proc.pid)

    def control(self, op: str, **params: Any) -> dict[str, Any]:
        """A control request, as ``meshgate ps/scale/down`` send it."""
        state = json.loads((self.state / "state.json").read_text())
        body = json.dumps({**params, "op": op, "token": state["control"]["token"]}) + "\n"

        with socket.create_connection(("127.0.0.1", state["control"]["port"]), timeout=5) as s:
            s.settimeout(120)
            s.sendall(body.encode())
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        answer: dict[str, Any] = json.loads(data)
        return answer

    def ps(self) -> dict[str, Any]:
        answer = self.control("ps")
        assert answer["ok"], answer
        self.snapshot()
        return answer

    def instance(self, name: str) -> dict[str, Any]:
        return next(i for i in self.ps()["instances"] if i["name"] == name)

    def gateway_url(self) -> str:
        return str(self.ps()["gateway"]["url"])

    def registered(self, service: str) -> set[str]:
        gateway = self.ps()["gateway"]
        token = Path(gateway["registry_token_file"]).read_text().strip()
        res = httpx.get(
            f"{gateway['registry_url']}/services/{service}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=5,
        )
        assert res.status_code == 200, res.text
        return {i["address"] for i in res.json()["instances"]}

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        """Send ``sig`` to its process group (what Ctrl-C in its terminal does); wait."""
        self.snapshot()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"meshgate up did not stop within {timeout:g} s:\n{tail(self.output)}")

    def leftovers(self, timeout: float = 5) -> list[int]:
        return [p.pid for p in wait_dead(sorted(self.known, key=lambda p: p.pid), timeout)]


def start_up(folder: Path, *args: str, venv: Venv | None = None) -> Up:
    """Start ``meshgate up`` in ``folder`` in a session of its own (so that the test's
    signals reach it as a terminal's would), with this Python or that of ``venv``."""
    output = folder / "up.out"
    base = dict(os.environ) if venv is None else venv.env()
    env = {**base, "HOME": str(folder), "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    env.pop("MESHGATE_FILE", None)
    python = sys.executable if venv is None else str(venv.python)
    with output.open("wb") as out:
        proc = subprocess.Popen(
            [python, "-m", "meshgate", "up", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=folder,
            env=env,
            start_new_session=True,
        )
    return Up(folder, proc, output)


def finish(up: Up) -> None:
    """Teardown: stop it if it still runs, then check that nothing it started is left."""
    problems = []
    if up.proc.poll() is None:
        up.snapshot()
        try:
            up.stop(signal.SIGTERM)
        except pytest.fail.Exception as exc:
            problems.append(str(exc))
            up.proc.kill()
            up.proc.wait(10)
    left = up.leftovers(15)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if left:
        problems.append(f"processes of meshgate up still alive: {left}\n{tail(up.output, 60)}")
    if problems:
        pytest.fail("\n".join(problems))


def shop_file(folder: Path) -> Path:
    """examples/shop/meshgate.yaml, run from ``folder``: the same services, settings
    and gateway configuration, with a free gateway port instead of 8080."""
    data = yaml.safe_load((SHOP / "meshgate.yaml").read_text())
    data["root"] = str(ROOT)
    data["gateway"]["config"] = str(SHOP / "gateway.yaml")
    data["gateway"]["listen"] = "127.0.0.1:0"
    path = folder / "meshgate.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---------------------------------------------------------------------------- the shop


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory, core_venv: Venv) -> Iterator[Up]:
    """The shop, run as the README's first command does: from a plain install (the
    core dependencies only, no extra)."""
    folder = tmp_path_factory.mktemp("shop")
    shop_file(folder)
    up = start_up(folder, venv=core_venv)
    try:
        took = up.wait_ready()
        print(f"\nup of the shop: ready in {took:.1f} s (as up reports it)")
        yield up
    finally:
        finish(up)


class Load:
    """GETs through the gateway in a thread until stopped; counts the answers."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok = 0
        self.failed: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                try:
                    res = client.get(self.url)
                except httpx.HTTPError as exc:
                    self.failed.append((time.monotonic(), repr(exc)))
                    continue
                if res.status_code == 200:
                    self.ok += 1
                else:
                    self.failed.append((time.monotonic(), f"{res.status_code} {res.text[:100]}"))
                time.sleep(0.005)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def test_shop_runs_and_the_readme_calls_work(shop: Up) -> None:
    ps = shop.ps()
    assert ps["status"] == "ready"
    names = {i["name"]: i for i in ps["instances"]}
    assert set(names) == {
        "gateway",
        "nats",
        "users-1",
        "users-2",
        "web-1",
        "inventory-1",
        "payments-1",
        "orders-1",
        "notifications-1",
    }
    assert all(i["status"] == "ready" and i["pid"] for i in names.values()), names
    # the migrations ran first, in the stream
    assert re.search(r"^users-migrate +\| ", shop.text(), re.M)
    assert re.search(
        r"^gateway +\| meshgate \S+: gateway on http://\S+ \(1 worker\); ", shop.text(), re.M
    )
    # The README's three calls, as printed (with this run's gateway URL).
    url = shop.gateway_url()
    with httpx.Client(base_url=url, timeout=10) as client:
        token = client.post("/api/demo-token")
        assert token.status_code == 200, token.text
        created = client.post(
            "/api/users",
            headers={"Authorization": f"Bearer {token.text}", "Content-Type": "application/json"},
            content=b'{"email": "ada@example.com", "name": "Ada Lovelace"}',
        )
        assert created.status_code == 201, created.text
        assert created.json()["id"] == 1
        fetched = client.get("/api/users/1")
        assert fetched.status_code == 200, fetched.text
        assert fetched.json()["name"] == "Ada Lovelace"
        profile = client.get("/api/profile/1")  # web -> users through the registry
        assert profile.json()["greeting"] == "Hello, Ada!", profile.text
        # The README's order lines: 202 with the id, pending, then completed or
        # cancelled with the reason (payments declines one charge in ten).
        placed = client.post(
            "/api/orders",
            headers={"Authorization": f"Bearer {token.text}", "Content-Type": "application/json"},
            content=b'{"user_id": 1, "items": [{"sku": "coffee", "quantity": 2}]}',
        )
        assert placed.status_code == 202, placed.text
        assert placed.json()["status"] == "pending"
        order_id = placed.json()["id"]
        deadline = time.monotonic() + 30
        while (order := client.get(f"/api/orders/{order_id}").json())["status"] == "pending":
            assert time.monotonic() < deadline, order
            time.sleep(0.1)
        assert order["status"] in ("completed", "cancelled"), order
        if order["status"] == "cancelled":
            assert order["reason"] == "step 'charge-payment' failed: payment declined"
        # users.created reached notifications through the embedded NATS.
        while not any(n["kind"] == "welcome" for n in client.get("/api/notifications").json()):
            assert time.monotonic() < deadline, "no welcome notification"
            time.sleep(0.1)
    # The example lines printed once ready are those calls, with the real URL.
    assert f"TOKEN=$(curl -s -X POST {url}/api/demo-token)" in shop.text()
    assert f"curl -s {url}/api/users/1" in shop.text()
    assert f"curl -s {url}/api/orders/1" in shop.text()
    # The merged stream: each line prefixed by its instance; the database in the state.
    shop.wait_for(r"^gateway +\| GET /api/users/1 200")  # the access log, written in batches
    assert (shop.state / "data" / "users.db").is_file()
    assert (shop.state / ".gitignore").read_text().strip().endswith("*")


def test_ps_and_logs_commands(shop: Up) -> None:
    runner = CliRunner()
    ps = runner.invoke(app, ["ps", "--file", str(shop.file)])
    assert ps.exit_code == 0, ps.output
    assert re.search(r"users-2 +\d+ +http://127\.0\.0\.1:\d+ +ready +ok +\d+", ps.output), ps.output
    logs = runner.invoke(app, ["logs", "users", "--file", str(shop.file), "-n", "200"])
    assert logs.exit_code == 0, logs.output
    assert re.search(r"^users-1 +\| users on http://127\.0\.0\.1:\d+$", logs.output, re.M)
    assert re.search(r"users-migrate +\| ", logs.output)
    assert "web-1" not in logs.output
    raw = runner.invoke(app, ["logs", "users-2", "--file", str(shop.file), "--raw"])
    assert '"message": "users registered as' in raw.output, raw.output


def test_ps_and_logs_from_the_root_of_the_system(shop: Up, monkeypatch: pytest.MonkeyPatch) -> None:
    # The README's case: up of a file below (examples/shop/meshgate.yaml with root
    # ../..), then the companions from the root, without --file.
    runner = CliRunner()
    monkeypatch.delenv("MESHGATE_FILE", raising=False)
    for folder in (ROOT, ROOT / "src" / "meshgate", shop.folder):
        monkeypatch.chdir(folder)
        ps = runner.invoke(app, ["ps"])
        assert ps.exit_code == 0, (folder, ps.output)
        assert ps.stdout.startswith("shop: ready, up "), ps.output
        assert f", {shop.file})" in ps.stdout.splitlines()[0]
        logs = runner.invoke(app, ["logs", "web", "-n", "200"])
        assert logs.exit_code == 0, logs.output
        assert re.search(r"^web-1 +\| web on http:", logs.stdout, re.M), logs.stdout
    named = runner.invoke(app, ["ps", "--system", "shop", "--json"])
    assert named.exit_code == 0, named.output
    assert json.loads(named.stdout)["file"] == str(shop.file)


def test_the_readme_s_serve_lines_add_an_instance_by_hand(shop: Up) -> None:
    # README: eval "$(meshgate env users)"; meshgate db upgrade ...; meshgate serve ...
    script = (
        'eval "$(meshgate env users)" && meshgate db upgrade examples.shop.users.app && '
        "exec meshgate serve examples.shop.users.app:service"
    )
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "NO_COLOR": "1"}
    env.pop("MESHGATE_FILE", None)
    out = shop.folder / "by-hand.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            ["sh", "-c", script], cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while (found := re.search(r"^users on http://(\S+)$", out.read_text(), re.M)) is None:
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.05)
        address = found[1]
        deadline = time.monotonic() + 30
        while address not in shop.registered("users"):
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        # The same database as the system's instances: what they wrote, it reads.
        user = httpx.get(f"{user_url(shop)}", timeout=10).json()
        mine = httpx.get(f"http://{address}/users/{user['id']}", timeout=10)
        assert mine.status_code == 200, mine.text
        assert "registered as users-" in out.read_text()
    finally:
        proc.terminate()
        proc.wait(30)
    assert address not in shop.registered("users")  # it left the registry as it stopped


def test_sagas_and_events_commands_find_the_running_system(shop: Up) -> None:
    runner = CliRunner()
    wide = {"COLUMNS": "250"}
    listed = runner.invoke(app, ["sagas", "list", "--file", str(shop.file), "--json"], env=wide)
    assert listed.exit_code == 0, listed.output
    sagas = json.loads(listed.output)
    assert "orders" in sagas["counts"]  # asked through the registry, one instance per service
    first = sagas["sagas"][-1]
    assert first["name"] == "place-order"
    shown = runner.invoke(app, ["sagas", "show", first["id"], "--file", str(shop.file)], env=wide)
    assert shown.exit_code == 0, shown.output
    assert "reserve-stock" in shown.output
    letters = runner.invoke(app, ["events", "dead-letters", "--file", str(shop.file)], env=wide)
    assert letters.exit_code == 0, letters.output
    assert "no dead letters on nats://127.0.0.1:" in letters.output  # the embedded server


def user_url(shop: Up) -> str:
    """The gateway URL of a user that exists (made here if needed)."""
    url = shop.gateway_url()
    with httpx.Client(base_url=url, timeout=10) as client:
        token = client.post("/api/demo-token").text
        made = client.post(
            "/api/users",
            json={"email": f"u{time.monotonic_ns()}@example.com", "name": "Load"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert made.status_code == 201, made.text
    return f"{url}/api/users/{made.json()['id']}"


def test_kill_9_of_a_service_is_restarted_and_traffic_recovers(shop: Up) -> None:
    target = user_url(shop)
    before = shop.instance("users-1")
    victim = Pid.of(before["pid"])
    assert victim is not None
    with Load(target) as load:
        time.sleep(0.3)
        killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        while True:
            now = shop.instance("users-1")
            if now["status"] == "ready" and now["pid"] not in (None, victim.pid):
                break
            assert time.monotonic() - killed_at < 20, (now, tail(shop.output))
            time.sleep(0.05)
        ready_after = time.monotonic() - killed_at
        # Serving again: the new instance is registered (the dead one was taken out),
        # and every request through the gateway succeeds.
        users = {i["address"] for i in shop.ps()["instances"] if i["service"] == "users"}
        assert shop.registered("users") == users
        recovered_at = time.monotonic()
        time.sleep(1.0)
    assert not victim.alive()
    assert now["restarts"] == before["restarts"] + 1
    restarted = r"^users-1 +\| was killed by SIGKILL; restarting in 0\.5 s$"
    assert re.search(restarted, shop.text(), re.M)
    late = [f for at, f in load.failed if at > recovered_at]
    assert late == [], late
    assert load.ok > 20
    print(
        f"\nkill -9 of users-1: ready and registered again after {ready_after:.2f} s; "
        f"{len(load.failed)} of {load.ok + len(load.failed)} requests failed meanwhile"
    )


def test_scale_users_to_3_then_back(shop: Up) -> None:
    runner = CliRunner()
    began = time.monotonic()
    result = runner.invoke(app, ["scale", "users=3", "--file", str(shop.file)])
    took = time.monotonic() - began
    assert result.exit_code == 0, result.output
    assert "users: 2 -> 3" in result.output
    users = [i for i in shop.ps()["instances"] if i["service"] == "users"]
    assert [i["name"] for i in users] == ["users-1", "users-2", "users-3"]
    assert all(i["status"] == "ready" for i in users)
    addresses = {i["address"] for i in users}
    assert shop.registered("users") == addresses  # registered when scale returns

    def served(address: str) -> float:
        text = httpx.get(f"http://{address}/metrics", timeout=5).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("meshgate_service_requests_total{")
            and 'route="/users/{user_id}"' in line
        )

    # The gateway sends to all three: its workers have them as endpoints, and under
    # concurrent load (its balancer weighs requests in flight) each one answers.
    gateway = shop.ps()["gateway"]
    admin_token = Path(gateway["admin_token_file"]).read_text().strip()
    upstreams = httpx.get(
        f"{gateway['admin_url']}/upstreams",
        headers={"Authorization": f"Bearer {admin_token}"},
        timeout=10,
    ).json()
    assert set(upstreams["upstreams"]["users"]["endpoints"]) == addresses, upstreams
    before = {a: served(a) for a in addresses}
    target = user_url(shop)
    deadline = time.monotonic() + 15
    with httpx.Client(timeout=10) as client, ThreadPoolExecutor(6) as pool:
        while True:
            codes = list(pool.map(lambda _: client.get(target).status_code, range(30)))
            assert codes == [200] * 30, codes
            after = {a: served(a) for a in addresses}
            if all(after[a] > before[a] for a in addresses):
                break
            assert time.monotonic() < deadline, (before, after)

    third = next(i for i in users if i["name"] == "users-3")
    third_pid = Pid.of(third["pid"])
    down = runner.invoke(app, ["scale", "users=2", "--file", str(shop.file)])
    assert down.exit_code == 0, down.output
    assert "users: 3 -> 2" in down.output
    assert third["address"] not in shop.registered("users")
    assert third_pid is not None
    assert not third_pid.alive()
    assert re.search(r"^users-3 +\| scaling down: draining$", shop.text(), re.M)
    print(f"\nscale users=3: returned with the third instance registered in {took:.2f} s")


def test_ctrl_c_stops_every_process(shop: Up) -> None:
    shop.snapshot()
    watched = set(shop.known)
    assert len(watched) >= 5, watched  # gateway (+ worker), users x2, web, watchdog
    began = time.monotonic()
    code = shop.stop(signal.SIGINT)
    took = time.monotonic() - began
    assert code == 0, tail(shop.output)
    left = [p.pid for p in wait_dead(sorted(watched, key=lambda p: p.pid), 1.0)]
    assert left == [], left
    text = shop.text()
    assert "SIGINT: stopping shop" in text
    assert re.search(r"none of the \d+ processes started is left", text), tail(shop.output)
    # Services drained before the gateway stopped: each deregistered itself.
    assert text.index("web-1") < text.rindex("users-1")
    assert json.loads((shop.state / "pids.json").read_text()) == {}
    print(f"\nCtrl-C: everything stopped in {took:.1f} s")


# ---------------------------------------------------------------------------- other systems

FILES = """\
services:
  files:
    command: ["{python}", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
"""


def test_two_systems_in_different_folders_do_not_collide(tmp_path: Path) -> None:
    ups = []
    for name in ("one", "two"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "meshgate.yaml").write_text(FILES)
        (folder / "marker.txt").write_text(f"I am {name}\n")
        ups.append(start_up(folder))
    try:
        for up in ups:
            up.wait_ready()
        urls = [up.gateway_url() for up in ups]
        assert urls[0] != urls[1]
        for up, url, name in zip(ups, urls, ("one", "two"), strict=True):
            # The generated gateway configuration routes /files to the command, which
            # the runner registered in this system's own registry.
            res = httpx.get(f"{url}/files/marker.txt", timeout=5)
            assert res.text == f"I am {name}\n", res.text
            assert up.instance("files-1")["status"] == "ready"
        # meshgate down from the folder of the first stops only that one.
        result = CliRunner().invoke(app, ["down", "--file", str(ups[0].file)])
        assert result.exit_code == 0, result.output
        assert "stopped one" in result.output
        assert ups[0].proc.wait(30) == 0
        assert ups[0].leftovers() == []
        assert ups[1].proc.poll() is None
        assert httpx.get(f"{urls[1]}/files/marker.txt", timeout=5).status_code == 200
    finally:
        for up in ups:
            finish(up)


def test_a_service_that_never_gets_ready_fails_up_and_leaves_nothing(tmp_path: Path) -> None:
    marker = f"never-ready-{os.getpid()}-{time.monotonic_ns()}"
    (tmp_path / "meshgate.yaml").write_text(
        f"""\
services:
  slow:
    command: ["{{python}}", "-c", "import time; print('booting {marker}'); time.sleep(300)"]
    ready: {{http: /health, timeout: 2s}}
"""
    )
    up = start_up(tmp_path)
    try:
        code = up.proc.wait(60)
    finally:
        finish(up)
    text = up.text()
    assert code == 1, text
    assert "slow-1 did not become ready within 2 s (services.slow.ready.timeout)" in text
    assert f"slow-1 | booting {marker}" in text  # its last lines
    assert "none of the 2 processes started is left" in text
    assert processes_with(marker) == []


def test_a_killed_runner_leaves_no_process_behind(tmp_path: Path) -> None:
    marker = f"orphan-check-{os.getpid()}-{time.monotonic_ns()}"
    (tmp_path / "meshgate.yaml").write_text(
        f"""\
services:
  shell:
    # A shell with a background child: the child is not the runner's child.
    command:
      - sh
      - -c
      - >-
        {{python}} -c 'import time; time.sleep(300)' {marker} &
        exec {{python}} -m http.server {{port}} --bind 127.0.0.1
"""
    )
    up = start_up(tmp_path)
    try:
        up.wait_ready()
        assert len(processes_with(marker)) == 1
        watched = set(up.known)
        up.proc.kill()  # SIGKILL: the runner cannot clean up
        up.proc.wait(10)
        left = [p.pid for p in wait_dead(sorted(watched, key=lambda p: p.pid), 15)]
        assert left == [], left
        assert processes_with(marker) == []
        # The lock died with it: the system can be started again at once.
        again = start_up(tmp_path)
        try:
            again.wait_ready()
        finally:
            finish(again)
    finally:
        finish(up)


def test_a_missing_extra_fails_up_with_one_line_naming_it(tmp_path: Path, core_venv: Venv) -> None:
    (tmp_path / "cached.py").write_text(
        "from meshgate.data import Cache\nfrom meshgate.service import Service\n"
        "service = Service('cached', cache=Cache('redis://127.0.0.1:6379/0'))\n"
    )
    (tmp_path / "meshgate.yaml").write_text("services:\n  cached: {app: cached:service}\n")
    up = start_up(tmp_path, venv=core_venv)
    try:
        code = up.proc.wait(60)
    finally:
        finish(up)
    text = up.text()
    assert code == 1, text
    assert "Traceback" not in text
    assert re.search(
        r"^cached-1 +\| error: cached:service: cache 'default': url: redis:// needs the redis "
        r"package, which is not installed: pip install 'meshgate\[redis\]'$",
        text,
        re.M,
    ), text


# ---------------------------------------------------------------------------- why not ready


def test_a_registry_that_does_not_work_fails_up_within_the_gateway_s_timeout(
    tmp_path: Path,
) -> None:
    (tmp_path / "gateway.yaml").write_text(
        "gateway:\n  workers: 1\n  registry: {redis: 'redis://127.0.0.1:1/0'}\nroutes: []\n"
    )
    (tmp_path / "meshgate.yaml").write_text(
        f"root: {ROOT}\n"
        "gateway: {config: gateway.yaml, ready_timeout: 10s}\n"
        "services:\n  users: {app: examples.shop.users.app:service, database: embedded}\n"
    )
    began = time.monotonic()
    up = start_up(tmp_path)
    try:
        code = up.proc.wait(60)
    finally:
        finish(up)
    took = time.monotonic() - began
    text = up.text()
    assert code == 1, text
    reason = (
        "its registry does not work: the registry at http://127.0.0.1:"
        r"\d+ answered 503 registry_unavailable: Redis at redis://127\.0\.0\.1:1/0 is "
        "unavailable"
    )
    assert re.search(rf"^gateway +\| not ready yet: {reason}", text, re.M), text
    assert re.search(
        r"could not start: gateway did not become ready within 10 s \(gateway\.ready_timeout\); "
        rf"it is ready when .*; the last check: {reason}",
        text,
    ), text
    assert took < 30, took


def test_a_service_that_cannot_register_never_says_registered(tmp_path: Path) -> None:
    # Its registry is a port where nothing listens: it is healthy, but never registered.
    (tmp_path / "meshgate.yaml").write_text(
        f"root: {ROOT}\n"
        "services:\n"
        "  users:\n"
        "    app: examples.shop.users.app:service\n"
        "    database: embedded\n"
        "    migrate: true\n"
        "    env: {MESHGATE_REGISTRY_URL: 'http://127.0.0.1:9'}\n"
        # Long enough for a slow machine to start it (imports, migrations) and log.
        "    ready: {timeout: 15s}\n"
    )
    up = start_up(tmp_path)
    try:
        code = up.proc.wait(60)
    finally:
        finish(up)
    text = up.text()
    assert code == 1, text
    warned = r"^users-1 +\| warning cannot register users/users-\S+ yet: "
    assert re.search(warned, text, re.M), text
    assert "registered as" not in text
    assert re.search(
        r"users-1 did not become ready within 15 s .*; the last check: users at 127\.0\.0\.1:\d+ "
        r"is not in the registry yet \(its log says why\)",
        text,
    ), text


# ---------------------------------------------------------------------------- ports of others


def held_port(*, reuse_port: bool = False) -> socket.socket:
    """A socket of this test listening on a free port (another process, to ``up``)."""
    sock = socket.socket()
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_a_fixed_port_that_another_process_holds_fails_up_naming_it(tmp_path: Path) -> None:
    with held_port() as other:
        port = other.getsockname()[1]
        (tmp_path / "meshgate.yaml").write_text(
            "services:\n"
            "  files:\n"
            '    command: ["{python}", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]\n'
            f"    port: {port}\n"
        )
        up = start_up(tmp_path)
        try:
            code = up.proc.wait(60)
        finally:
            finish(up)
    text = up.text()
    assert code == 1, text
    assert (
        f"could not start: files-1 could not be started: port {port} (services.files.port) is "
        f"in use: Address already in use: held by pid {os.getpid()} ("
    ) in text, text
    assert "files-1 is ready" not in text


def test_a_gateway_port_shared_with_reuse_port_is_refused(tmp_path: Path) -> None:
    # SO_REUSEPORT would let the gateway bind beside it, and the kernel would send
    # part of the traffic to this socket: the port is refused before the start.
    with held_port(reuse_port=True) as other:
        port = other.getsockname()[1]
        (tmp_path / "meshgate.yaml").write_text(f"gateway: {{listen: '127.0.0.1:{port}'}}\n")
        up = start_up(tmp_path)
        try:
            code = up.proc.wait(60)
        finally:
            finish(up)
    text = up.text()
    assert code == 1, text
    assert (
        f"gateway could not be started: port {port} (gateway.listen) is in use: Address "
        f"already in use: held by pid {os.getpid()} ("
    ) in text, text


# ---------------------------------------------------------------------------- detached, edits


def run_cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``meshgate ARGS`` as its own process, as a user runs it."""
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("MESHGATE_FILE", None)
    return subprocess.run(
        [sys.executable, "-m", "meshgate", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
        check=False,
    )


COLOURED = """\
services:
  files:
    command:
      - sh
      - -c
      - echo "color=$COLOR"; exec {python} -m http.server {port} --bind 127.0.0.1
    replicas: REPLICAS
    env: {COLOR: COLOUR}
"""


def coloured(replicas: int, colour: str) -> str:
    return COLOURED.replace("REPLICAS", str(replicas)).replace("COLOUR", colour)


def wait_until(what: str, check: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:g} s: {what}")
        time.sleep(0.1)


def test_up_detached_then_edits_restart_logs_and_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "meshgate.yaml"
    file.write_text(coloured(1, "red"))
    started = run_cli("up", "-d", str(file), cwd=tmp_path)
    state = json.loads((tmp_path / ".meshgate" / "state.json").read_text())
    runner_pid = Pid.of(state["pid"])
    assert runner_pid is not None
    known = descendants(runner_pid.pid) | {runner_pid}
    log = tmp_path / ".meshgate" / "up.log"
    try:
        assert started.returncode == 0, (started.stdout, started.stderr)
        assert f"{tmp_path.name} is ready (meshgate up pid {runner_pid.pid}" in started.stdout
        assert re.search(r"^files-1 +\d+ +http://127\.0\.0\.1:\d+ +ready", started.stdout, re.M)
        assert "It runs in the background: meshgate ps, meshgate logs -f, meshgate down" in (
            started.stdout
        )
        assert "is ready: 2 processes" in log.read_text()

        monkeypatch.chdir(tmp_path)
        monkeypatch.delenv("MESHGATE_FILE", raising=False)
        cli = CliRunner()
        ps = cli.invoke(app, ["ps"])
        assert ps.exit_code == 0, ps.output

        # logs -f of a detached system: the lines of its instances as they come.
        env = {**os.environ, "NO_COLOR": "1"}
        with subprocess.Popen(
            [sys.executable, "-m", "meshgate", "logs", "files", "-f"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        ) as follower:
            assert follower.stdout is not None
            seen = follower.stdout.readline()
            while "color=" not in seen:
                seen = follower.stdout.readline()
            follower.terminate()
        assert seen.strip() == "files-1 | color=red"

        # An edit: more replicas (applied), another env (for instances that start
        # from now on), a gateway port (needs a new up).
        file.write_text(coloured(2, "blue") + "gateway: {listen: '127.0.0.1:0', workers: 2}\n")
        wait_until(
            "files-2 is ready",
            lambda: (
                "files-2" in log.read_text()
                and any(
                    i["name"] == "files-2" and i["status"] == "ready"
                    for i in json.loads(cli.invoke(app, ["ps", "--json"]).stdout)["instances"]
                )
            ),
        )
        text = log.read_text()
        assert "meshgate.yaml: replicas changed; scaling to files=2" in text
        assert (
            "meshgate.yaml: services.files: env changed; instances that start from now on use "
            "it, the running ones once restarted: meshgate restart files"
        ) in text
        assert (
            "meshgate.yaml: gateway changed, which a running system cannot take: not applied; "
            "it needs a new up (meshgate down, then meshgate up)"
        ) in text
        assert "files-2 | color=blue" in cli.invoke(app, ["logs", "files-2"]).stdout
        assert "files-1 | color=red" in cli.invoke(app, ["logs", "files-1"]).stdout

        before = {
            i["name"]: i["pid"]
            for i in json.loads(cli.invoke(app, ["ps", "--json"]).stdout)["instances"]
        }
        known |= descendants(runner_pid.pid)
        restarted = cli.invoke(app, ["restart", "files"])
        assert restarted.exit_code == 0, restarted.output
        assert re.search(r"^files: restarted files-1, files-2 in [\d.]+ s$", restarted.stdout, re.M)
        after = {
            i["name"]: i for i in json.loads(cli.invoke(app, ["ps", "--json"]).stdout)["instances"]
        }
        assert after["files-1"]["pid"] != before["files-1"]
        assert after["files-2"]["pid"] != before["files-2"]
        assert all(after[n]["status"] == "ready" for n in ("files-1", "files-2"))
        last = cli.invoke(app, ["logs", "files-1", "-n", "3"]).stdout.splitlines()
        assert "files-1 | color=blue" in last, last
        unknown = cli.invoke(app, ["restart", "nope"])
        assert unknown.exit_code == 1
        assert (
            "nothing named 'nope' runs; known: gateway, files, files-1, files-2" in unknown.stderr
        )

        known |= descendants(runner_pid.pid)
        down = cli.invoke(app, ["down"])
        assert down.exit_code == 0, down.output
        assert down.stdout == f"stopped {tmp_path.name}\n"
    finally:
        if runner_pid.alive():
            os.kill(runner_pid.pid, signal.SIGTERM)
        left = [p.pid for p in wait_dead(sorted(known, key=lambda p: p.pid), 30)]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert left == [], (left, tail(log, 60))
    assert "none of the" in log.read_text()


def test_up_detached_that_fails_prints_why(tmp_path: Path) -> None:
    (tmp_path / "meshgate.yaml").write_text(
        "services:\n  bad:\n    command: ['sh', '-c', 'echo broken setting; exit 3']\n"
        "    ready: {log: never}\n"
    )
    result = run_cli("up", "-d", cwd=tmp_path)
    assert result.returncode == 1, result
    assert "bad-1 exited with code 3; its last lines:" in result.stderr
    assert "bad-1 | broken setting" in result.stderr
    assert result.stdout == ""
