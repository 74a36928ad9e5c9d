"""Real virtual environments holding only some of meshgate's dependencies, to run
meshgate as a user's plain ``pip install meshgate`` (or one with some extras) does.

Nothing is downloaded: each venv's ``site-packages`` links to the distributions
already installed where the tests run, but only to those a given set of
requirements pulls in (read from this checkout's pyproject.toml, markers and
extras evaluated). meshgate itself comes from this checkout's ``src`` through
``PYTHONPATH`` (see :meth:`Venv.env`). Built once per session, in well under a
second.

The fixture ``core_venv`` is a plain install: the core dependencies only, so
redis, asyncpg, psycopg, asyncmy and pymysql are absent.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

__all__ = ["Venv", "build_venv", "core_requirements", "core_venv"]

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
OPTIONAL = ("redis", "asyncpg", "psycopg", "asyncmy", "pymysql")
"""Modules of optional extras: none of them is in a plain install."""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def core_requirements() -> list[str]:
    """``project.dependencies`` of this checkout's pyproject.toml."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return list(data["project"]["dependencies"])


def _closure(requirements: Iterable[str]) -> set[str]:
    """The installed distributions (canonical names) that ``requirements`` pull in."""
    found: set[str] = set()
    todo: list[tuple[str, frozenset[str]]] = []

    def want(text: str, extras: frozenset[str]) -> None:
        req = Requirement(text)
        if req.marker is not None:
            envs = [{**default_environment(), "extra": e} for e in (extras or {""})]
            if not any(req.marker.evaluate(env) for env in envs):
                return
        todo.append((_canonical(req.name), frozenset(req.extras)))

    for text in requirements:
        want(text, frozenset())
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        found.add(name)
        for text in importlib.metadata.requires(name) or []:
            want(text, extras)
    return found


def _top_level(name: str, site: Path) -> Iterator[str]:
    """The entries of ``site`` (packages, modules, .dist-info) that distribution ``name``
    installed."""
    dist = importlib.metadata.distribution(name)
    for file in dist.files or []:
        path = (site / file).resolve()
        try:
            relative = path.relative_to(site)
        except ValueError:
            continue  # a script in bin/, say
        yield relative.parts[0]


@dataclass(frozen=True)
class Venv:
    """A virtual environment: its interpreter and the environment to run it with."""

    path: Path
    distributions: frozenset[str]

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for this venv's Python: meshgate from this checkout."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env.update({"PYTHONPATH": str(SRC), "VIRTUAL_ENV": str(self.path)}, **extra)
        env["PATH"] = f"{self.path / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return env

    def run(
        self, *args: str, cwd: Path | None = None, timeout: float = 60, **env: str
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python -m meshgate ARGS`` in it; stdout and stderr as text."""
        return subprocess.run(
            [str(self.python), "-m", "meshgate", *args],
            capture_output=True,
            text=True,
            cwd=cwd,
            env=self.env(**env),
            timeout=timeout,
            check=False,
        )


def build_venv(path: Path, requirements: Iterable[str]) -> Venv:
    """A venv at ``path`` with exactly the installed distributions ``requirements``
    pull in (linked, not copied)."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=60
    )
    here = Path(sysconfig.get_paths()["purelib"]).resolve()
    major, minor = sys.version_info[:2]
    site = path / "lib" / f"python{major}.{minor}" / "site-packages"
    wanted = _closure(requirements) - {"meshgate"}
    for name in sorted(wanted):
        for entry in set(_top_level(name, here)):
            target = site / entry
            if not target.exists():
                target.symlink_to(here / entry)
    return Venv(path, frozenset(wanted))


@pytest.fixture(scope="session")
def core_venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """A plain ``pip install meshgate``: the core dependencies and nothing else."""
    venv = build_venv(tmp_path_factory.mktemp("venv") / "core", core_requirements())
    missing = [m for m in OPTIONAL if _importable(venv, m)]
    assert missing == [], f"optional modules in the core venv: {missing}"
    return venv


def _importable(venv: Venv, module: str) -> bool:
    probe = subprocess.run(
        [str(venv.python), "-c", f"import {module}"],
        capture_output=True,
        env=venv.env(),
        timeout=30,
        check=False,
    )
    return probe.returncode == 0
