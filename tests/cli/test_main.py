"""The ``meshgate`` command: exit codes, what goes to stdout and stderr, and never a
traceback for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from meshgate import __version__
from meshgate.cli import app

VALID = """\
gateway:
  listen: 127.0.0.1:0
upstreams:
  users: {endpoints: ["127.0.0.1:9001", "127.0.0.1:9002"]}
  orders: {endpoints: ["127.0.0.1:9003"]}
routes:
  - name: users
    match: {path_prefix: /users}
    upstream: users
  - name: orders
    match: {path_prefix: /orders}
    upstream: orders
"""


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def write(tmp_path: Path, text: str, name: str = "gateway.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_version_prints_the_version(runner: CliRunner) -> None:
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0
    assert result.stdout == f"{__version__}\n"
    assert result.stderr == ""


def test_check_accepts_a_valid_file(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    result = runner.invoke(app, ["check", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{path}: ok (gateway configuration: 2 routes, 2 upstreams)\n"
    assert result.stderr == ""


def test_check_accepts_the_shipped_example(runner: CliRunner) -> None:
    example = Path(__file__).parents[2] / "examples" / "gateway.yaml"
    result = runner.invoke(app, ["check", str(example)])
    assert result.exit_code == 0, result.output
    assert ": ok (" in result.stdout


SHOP = Path(__file__).parents[2] / "examples" / "shop"


def test_check_of_a_system_file_checks_it_as_one(runner: CliRunner) -> None:
    result = runner.invoke(app, ["check", str(SHOP / "meshgate.yaml")])
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        f"{SHOP / 'meshgate.yaml'}: ok (system file: 6 services, 7 instances; gateway "
        "configuration gateway.yaml: 7 routes)\n"
    )
    one = runner.invoke(app, ["check", str(SHOP / "gateway.yaml")])
    assert (
        one.stdout
        == f"{SHOP / 'gateway.yaml'}: ok (gateway configuration: 7 routes, 5 upstreams)\n"
    )


def test_check_of_a_bad_system_file_lists_its_problems(runner: CliRunner, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "services:\n  users: {app: 'x:y', replica: 2}\n  web: {app: 'w:s', depends_on: [user]}\n",
        "system.yaml",  # not named meshgate.yaml: told by its keys
    )
    result = runner.invoke(app, ["check", str(path)])
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0] == f"{path}: 1 problem in the configuration"
    assert lines[1].startswith("  services.users.replica (line 2): unknown key 'replica'")
    assert len(lines) == 2  # told for certain: no hint about the other kind


@pytest.mark.parametrize(
    ("name", "checked_as", "other"),
    [
        ("meshgate.yaml", "a system file", "gateway"),
        ("gw.yaml", "a gateway configuration", "system"),
    ],
    ids=["named-meshgate-yaml", "other-name"],
)
def test_check_says_how_to_check_as_the_other_kind_when_unsure(
    runner: CliRunner, tmp_path: Path, name: str, checked_as: str, other: str
) -> None:
    # Only the key both kinds have: the name decides.
    path = write(tmp_path, "gateway: {workers: 1, listn: x}\n", name)
    result = runner.invoke(app, ["check", str(path)])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        f"(checked as {checked_as}; give --kind {other} to check it as the other kind)"
    )
    forced = runner.invoke(app, ["check", str(path), "--kind", other])
    assert forced.exit_code == 1
    assert "(checked as" not in forced.stderr
    bad = runner.invoke(app, ["check", str(path), "--kind", "compose"])
    assert bad.exit_code == 2
    assert "--kind 'compose' is not one of system, gateway" in bad.stderr


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        pytest.param(
            "upstream: orders\n",
            "upstream: order\n",
            "routes[1].upstream (line 12): no upstream named 'order' (did you mean 'orders'?)",
            id="dangling-upstream",
        ),
        pytest.param(
            "  listen: 127.0.0.1:0\n",
            "  listn: 127.0.0.1:0\n",
            "gateway.listn (line 2): unknown key 'listn' (did you mean 'listen'?)",
            id="unknown-key",
        ),
        pytest.param(
            "listen: 127.0.0.1:0",
            "listen: nowhere",
            "gateway.listen (line 2): 'nowhere' is not an address",
            id="bad-address",
        ),
        pytest.param(
            '"127.0.0.1:9003"',
            '"127.0.0.1:9003", "127.0.0.1:9003"',
            "upstreams.orders.endpoints[1] (line 5): endpoint 127.0.0.1:9003 is listed twice",
            id="duplicate-endpoint",
        ),
        pytest.param(
            "match: {path_prefix: /orders}",
            "match: {path_prefix: orders}",
            "routes[1].match.path_prefix (line 11): 'orders' must start with '/'",
            id="bad-prefix",
        ),
        pytest.param(
            "routes:\n",
            "routes: [\n",
            "(document) (line ",
            id="not-yaml",
        ),
    ],
)
def test_check_rejects_an_invalid_file_naming_field_and_line(
    runner: CliRunner, tmp_path: Path, old: str, new: str, expected: str
) -> None:
    assert old in VALID
    path = write(tmp_path, VALID.replace(old, new, 1))
    result = runner.invoke(app, ["check", str(path)])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    assert result.stderr.startswith(f"{path}: 1 problem in the configuration\n"), result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_check_lists_every_problem_at_once(runner: CliRunner, tmp_path: Path) -> None:
    text = (
        VALID.replace("  listen: 127.0.0.1:0\n", "  listen: 127.0.0.1:0\n  workers: -1\n")
        .replace("orders: {endpoints", "orders: {timeout: 3, endpoints")
        .replace("match: {path_prefix: /users}", "match: {path_prefix: /users, methods: [GRAB]}")
    )
    path = write(tmp_path, text)
    result = runner.invoke(app, ["check", str(path)])
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [
        f"{path}: 3 problems in the configuration",
        "  gateway.workers (line 3): Input should be greater than or equal to 0 (got -1)",
        (
            "  upstreams.orders.timeout (line 6): unknown key 'timeout' (did you mean "
            "'timeouts'?); allowed keys: balancer, circuit_breaker, endpoints, hash, health, "
            "idle_timeout, max_connections, retries, service, sticky, "
            "timeouts, tls"
        ),
        (
            "  routes[0].match.methods (line 9): 'GRAB' is not an HTTP method; "
            "use one of DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT, TRACE"
        ),
    ]


@pytest.mark.parametrize(
    ("extra", "replace", "expected"),
    [
        pytest.param(
            "  tls: {certificates: [{cert: missing.pem, key: missing.key}]}\n",
            None,
            "gateway.tls.certificates[0].cert: no such file 'missing.pem'",
            id="tls-certificate",
        ),
        pytest.param(
            "",
            "upstream: users\n  - name: orders",
            "routes[0].auth.jwt.keys[0].file: no such file 'keys/missing.pem'",
            id="jwt-key",
        ),
    ],
)
def test_check_reads_the_files_the_configuration_names(
    runner: CliRunner, tmp_path: Path, extra: str, replace: str | None, expected: str
) -> None:
    text = VALID.replace("  listen: 127.0.0.1:0\n", "  listen: 127.0.0.1:0\n" + extra)
    if replace is not None:
        auth = (
            "upstream: users\n    auth: {jwt: {algorithms: [RS256], "
            "keys: [{file: keys/missing.pem}]}}\n  - name: orders"
        )
        text = text.replace(replace, auth, 1)
    path = write(tmp_path, text)
    result = runner.invoke(app, ["check", str(path)])
    assert result.exit_code == 1, result.output
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_check_of_a_missing_file_says_so(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    result = runner.invoke(app, ["check", str(path)])
    assert result.exit_code == 1
    assert f"no such file '{path}'" in result.stderr
    assert "Traceback" not in result.stderr


def test_gateway_rejects_an_unknown_log_level(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    result = runner.invoke(app, ["gateway", str(path), "--log-level", "loud"])
    assert result.exit_code == 2
    assert "--log-level 'loud' is not one of debug, info, warning, error" in result.stderr


def run_meshgate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real entry point in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "meshgate", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=cwd,
    )


def test_gateway_with_a_missing_file_exits_1_without_traceback(tmp_path: Path) -> None:
    # A child process: `gateway` configures process-wide logging before it reads the file.
    proc = run_meshgate("gateway", "missing.yaml", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == "missing.yaml: cannot read the file: No such file or directory\n"
    assert proc.stdout == ""


def test_gateway_with_an_invalid_file_exits_1_naming_the_field(tmp_path: Path) -> None:
    write(tmp_path, VALID.replace("upstream: orders\n", "upstream: order\n"))
    proc = run_meshgate("gateway", "gateway.yaml", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "routes[1].upstream (line 12): no upstream named 'order'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_check_through_the_real_entry_point(tmp_path: Path) -> None:
    write(tmp_path, VALID)
    proc = run_meshgate("check", "gateway.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "gateway.yaml: ok (gateway configuration: 2 routes, 2 upstreams)\n"
    write(tmp_path, VALID.replace("  listen: 127.0.0.1:0\n", "  listn: 127.0.0.1:0\n"))
    proc = run_meshgate("check", "gateway.yaml", cwd=tmp_path)
    assert proc.returncode == 1
    assert "gateway.listn (line 2)" in proc.stderr
    assert "Traceback" not in proc.stderr


def _commands(group: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every command below ``group`` (typer's click objects), by its full name."""
    found = []
    for name, command in group.commands.items():
        found.append((prefix + name, command))
        if getattr(command, "commands", None):
            found.extend(_commands(command, f"{prefix}{name} "))
    return found


def test_help_texts_are_unwrapped_paragraphs() -> None:
    # Hard line breaks from the docstrings made the list of commands wrap in the
    # middle of sentences.
    commands = _commands(typer.main.get_command(app))
    assert {"up", "ps", "restart", "db backup", "db upgrade"} <= {name for name, _ in commands}
    for name, command in commands:
        text = command.help or ""
        assert text, f"{name} has no help"
        assert "\n" not in text.replace("\n\n", ""), f"{name}: {text!r}"


def test_the_list_of_commands_breaks_lines_at_the_terminal_s_width(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    assert (
        "Show the instances of the running system: pid, address, status, health, restarts and "
        "uptime."
    ) in result.stdout
    narrow = runner.invoke(app, ["--help"], env={"COLUMNS": "120"})
    row = next(line for line in narrow.stdout.splitlines() if " ps " in line)
    assert "status, health, restarts and uptime." in row, row
