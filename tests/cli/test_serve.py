"""``meshgate serve``: a service that may not start says why, in one line, and exits 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_service_on_a_database_not_migrated_exits_saying_why(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "USERS_DATABASE_URL": f"sqlite:///{tmp_path / 'users.db'}",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("MESHGATE_MIGRATE", None)
    env.pop("MESHGATE_REGISTRY_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "meshgate", "serve", "examples.shop.users.app:service"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("error: users cannot start: database 'users'")
    assert "has no schema revision" in errors[0]
    assert "meshgate db upgrade" in errors[0]
