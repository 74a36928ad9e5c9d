"""Run the gateway in front of two demo upstreams: what `make demo` starts.

    .venv/bin/python examples/demo.py

Starts `users-1` and `users-2` (demo upstreams on 127.0.0.1:9001 and :9002) and the
gateway from examples/gateway.yaml on 127.0.0.1:8080, prints a few requests to try,
and stops everything on Ctrl-C.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _start(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "meshgate", *args])  # noqa: S603


def main() -> int:
    procs = [
        _start("demo-upstream", "--listen", "127.0.0.1:9001", "--name", "users-1"),
        _start("demo-upstream", "--listen", "127.0.0.1:9002", "--name", "users-2"),
    ]
    gateway = _start("gateway", str(HERE / "gateway.yaml"))
    procs.append(gateway)
    time.sleep(2.5)
    if gateway.poll() is not None:
        print("the gateway did not start; see the messages above", file=sys.stderr)  # noqa: T201
        for proc in procs:
            proc.terminate()
        return 1
    print(  # noqa: T201
        "\nTry (requests are spread over users-1 and users-2):\n"
        "  curl -i http://127.0.0.1:8080/api/users/42\n"
        "  curl -i http://127.0.0.1:8080/nothing-here        # JSON 404\n"
        '  curl -s -H "Authorization: Bearer $(cat ~/.meshgate/admin-9901.token)" '
        "http://127.0.0.1:9901/metrics\n"
        "Ctrl-C stops everything.\n",
        flush=True,
    )
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    # Set explicitly: a shell starting us in the background leaves SIGINT ignored.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stop and all(p.poll() is None for p in procs):
            signal.pause()
        for proc in procs:
            if proc.poll() is not None:
                print(f"{' '.join(map(str, proc.args))} exited", file=sys.stderr)  # noqa: T201
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=35)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
