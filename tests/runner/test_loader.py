"""The system file: what is accepted, and for what is not, the path of the field,
its line and the fix, worded like the gateway configuration's errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshgate.errors import ConfigError
from meshgate.runner import load_system, loads_system, start_order
from meshgate.runner.loader import expand, placeholders, readiness, registers

ROOT = Path(__file__).resolve().parents[2]
SHOP = ROOT / "examples" / "shop" / "meshgate.yaml"


def issues(text: str, folder: Path) -> list[str]:
    """The problems of a system file, as ``path (line N): message`` lines."""
    with pytest.raises(ConfigError) as caught:
        loads_system(text, folder / "meshgate.yaml")
    assert caught.value.source == str(folder / "meshgate.yaml")
    return [str(issue) for issue in caught.value.issues]


def test_the_shop_file_is_valid() -> None:
    sf = load_system(SHOP)
    assert sf.name == "shop"
    assert sf.root == ROOT
    assert sf.state == SHOP.parent / ".meshgate"
    assert sf.gateway_config_path == SHOP.parent / "gateway.yaml"
    assert sf.gateway_config is not None
    assert str(sf.system.gateway.listen) == "127.0.0.1:8080"
    users = sf.system.services["users"]
    assert (users.replicas, users.database, users.cache, users.migrate) == (
        2,
        "embedded",
        "embedded",
        True,
    )
    assert start_order(sf.system) == [
        "users",
        "web",
        "inventory",
        "payments",
        "orders",
        "notifications",
    ]
    assert sf.warnings == ()


def test_an_empty_file_is_a_system_with_only_a_gateway(tmp_path: Path) -> None:
    sf = loads_system("", tmp_path / "meshgate.yaml")
    assert sf.system.services == {}
    assert sf.gateway_config is None
    assert sf.name == tmp_path.name[:63]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "gateway: {listn: 1}\n",
            "gateway.listn (line 1): unknown key 'listn' (did you mean 'listen'?); allowed "
            "keys: admin, config, listen, ready_timeout, stop_timeout, workers",
            id="unknown-key",
        ),
        pytest.param(
            "services:\n  users:\n    app: x:y\n    replica: 2\n",
            "services.users.replica (line 4): unknown key 'replica' (did you mean 'replicas'?)",
            id="unknown-service-key",
        ),
        pytest.param(
            "services:\n  users: {app: x:y, replicas: many}\n",
            "services.users.replicas (line 2): Input should be a valid integer",
            id="bad-int",
        ),
        pytest.param(
            "services:\n  user-admin: {app: x:y, replicas: many}\n",
            "services.user-admin.replicas (line 2): Input should be a valid integer",
            id="bad-int-in-a-dashed-name",
        ),
        pytest.param(
            "services:\n  users: {app: 'not an app'}\n",
            "services.users.app (line 2): 'not an app' is not module:attribute; write it like "
            "examples.shop.users.app:service",
            id="bad-app",
        ),
        pytest.param(
            "services:\n  users: {app: x:y, restart: sometimes}\n",
            "services.users.restart (line 2): Input should be 'always', 'on-failure' or 'never' "
            "(got 'sometimes')",
            id="bad-restart",
        ),
        pytest.param(
            "services:\n  users:\n    app: x:y\n    env: {1X: a}\n",
            "services.users.env.1X (line 4): '1X' is not an environment variable name",
            id="bad-env-name",
        ),
        pytest.param(
            "services:\n  users:\n    app: x:y\n    env: {A: null}\n",
            "services.users.env.A (line 4): an environment value cannot be null; write '' for "
            "an empty one",
            id="null-env",
        ),
        pytest.param(
            "services:\n  users: {app: x:y, database: users.db}\n",
            "services.users.database (line 2): 'users.db' is neither 'embedded' nor a URL",
            id="bad-database",
        ),
        pytest.param(
            "services:\n  users: {command: ''}\n",
            "services.users.command (line 2): the command is empty; give the program to run",
            id="empty-command",
        ),
        pytest.param(
            "services:\n  users:\n    command: x\n    ready: {http: health}\n",
            "services.users.ready.http (line 4): 'health' is not a path; write it from the "
            "root, such as /health",
            id="bad-ready-path",
        ),
        pytest.param(
            "services:\n  on: {app: x:y}\n",
            "services.true (line 2): a key was read as true: YAML reads unquoted on, off, yes "
            "and no as booleans; quote the key or check its spelling",
            id="yaml-boolean-key",
        ),
        pytest.param(
            "services: [users]\n",
            "services (line 1): Input should be a valid dictionary",
            id="services-not-a-mapping",
        ),
        pytest.param(
            "services:\n  users: {app: x:y}\n  yes: {app: x:y}\n",
            "services.true (line 3): a key was read as true",
            id="yaml-boolean-key-yes",
        ),
        pytest.param(
            "services: {users: {app: x:y}\n",
            "(document) (line 2): not valid YAML",
            id="not-yaml",
        ),
        pytest.param(
            "- a\n",
            "(document) (line 1): the document must be a mapping with gateway and services",
            id="not-a-mapping",
        ),
        pytest.param(
            "observability: {otlp: {endpoint: 'collector:4318'}}\n",
            "observability.otlp.endpoint (line 1): 'collector:4318' is not an http(s) URL; "
            "write the collector's OTLP/HTTP base URL, such as http://127.0.0.1:4318",
            id="otlp-endpoint-not-a-url",
        ),
        pytest.param(
            "observability:\n  otlp:\n    endpoint: 'http://u:pw@c:4318/?x=1'\n",
            "observability.otlp.endpoint (line 3): 'http://u:***@c:4318/?x=1' has a query or "
            "fragment; give the base URL only (/v1/traces is added)",
            id="otlp-endpoint-with-a-query-masked",
        ),
        pytest.param(
            "observability:\n  otlp:\n    headers: {'x key': v}\n",
            "observability.otlp.headers.x key (line 3): 'x key' is not an HTTP header name; "
            "use letters, digits and '-', such as x-api-key",
            id="otlp-header-name",
        ),
        pytest.param(
            'observability:\n  otlp:\n    headers: {apikey: "a\\nb"}\n',
            "observability.otlp.headers.apikey (line 3): a header value cannot hold a line "
            "break or NUL; write it on one line",
            id="otlp-header-value",
        ),
        pytest.param(
            "observability:\n  sampling: {ratio: 5}\n",
            "observability.sampling.ratio (line 2): Input should be less than or equal to 1",
            id="sampling-ratio",
        ),
        pytest.param(
            "observability: {tracing: true}\n",
            "observability.tracing (line 1): unknown key 'tracing'; allowed keys: otlp, sampling",
            id="observability-unknown-key",
        ),
    ],
)
def test_field_errors(text: str, expected: str, tmp_path: Path) -> None:
    found = issues(text, tmp_path)
    assert any(issue.startswith(expected) for issue in found), found


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "services:\n  users: {replicas: 2}\n",
            "services.users (line 2): nothing to run: give app (module:attribute of a "
            "meshgate Service) or command (a program, with {port} where it should listen)",
            id="nothing-to-run",
        ),
        pytest.param(
            "services:\n  users: {app: x:y, command: z}\n",
            "services.users.command (line 2): give app or command, not both",
            id="app-and-command",
        ),
        pytest.param(
            "services:\n  gateway: {app: x:y}\n",
            "services.gateway (line 2): 'gateway' is the runner's name for the gateway; give "
            "the service another",
            id="reserved-name",
        ),
        pytest.param(
            "services:\n  users:\n    command: z\n    migrate: true\n",
            "services.users.migrate (line 4): migrate runs meshgate db upgrade of an app's "
            "module; it needs app:",
            id="migrate-without-app",
        ),
        pytest.param(
            "services:\n  users: {app: x:y, registry: false}\n",
            "services.users.registry (line 2): an app registers itself once ready",
            id="registry-on-an-app",
        ),
        pytest.param(
            "services:\n  users: {command: z, log_level: debug}\n",
            "services.users.log_level (line 2): log_level is passed to meshgate serve",
            id="log-level-of-a-command",
        ),
        pytest.param(
            "services:\n  users: {command: z, ready: {http: /h, tcp: true}}\n",
            "services.users.ready (line 2): give one way to know readiness, not http and tcp",
            id="two-readiness-checks",
        ),
        pytest.param(
            "services:\n  users: {app: x:y, ready: {tcp: true}}\n",
            "services.users.ready (line 2): an app is ready when its /health/ready passes",
            id="tcp-readiness-of-an-app",
        ),
        pytest.param(
            "services:\n  web: {app: x:y, depends_on: [user]}\n  users: {app: x:y}\n",
            "services.web.depends_on[0] (line 2): no service named 'user' (did you mean "
            "'users'?); known: users, web",
            id="unknown-dependency",
        ),
        pytest.param(
            "services:\n  web: {app: x:y, depends_on: [web]}\n",
            "services.web.depends_on[0] (line 2): a service cannot depend on itself",
            id="self-dependency",
        ),
        pytest.param(
            "services:\n  a: {app: x:y, depends_on: [b]}\n  b: {app: x:y, depends_on: [c]}\n"
            "  c: {app: x:y, depends_on: [a]}\n",
            "services.a.depends_on (line 2): dependency cycle a -> b -> c -> a: nothing in it "
            "could start first; remove one of these dependencies",
            id="cycle",
        ),
        pytest.param(
            "services:\n  users:\n    app: x:y\n    env: {URL: 'http://{gatway}/x'}\n",
            "services.users.env.URL (line 4): unknown placeholder {gatway} (did you mean "
            "'gateway'?); known: admin, gateway, index, instance, name, python, root, state, "
            "system; write {{ and }} for a literal brace",
            id="unknown-placeholder",
        ),
        pytest.param(
            "services:\n  users:\n    app: x:y\n    env: {P: '{port}'}\n",
            "services.users.env.P (line 4): unknown placeholder {port}",
            id="port-of-an-app",
        ),
        pytest.param(
            "services:\n  users:\n    command: ['x', '{port:>5}']\n",
            "services.users.command[1] (line 3): {port:>5} is not a placeholder name; write "
            "{{ and }} for a literal brace",
            id="placeholder-with-format",
        ),
        pytest.param(
            "services:\n  users:\n    app: x:y\n    env: {J: '{\"a\": 1}'}\n",
            'services.users.env.J (line 4): {"a": 1} is not a placeholder name',
            id="json-needs-doubled-braces",
        ),
        pytest.param(
            "examples: ['curl {gateway}/x {port}']\n",
            "examples[0] (line 1): unknown placeholder {port}",
            id="example-placeholder",
        ),
        pytest.param(
            "gateway: {listen: ':9000', admin: '127.0.0.1:9000'}\n",
            "gateway.admin (line 1): port 9000 is also gateway.listen",
            id="gateway-ports",
        ),
        pytest.param(
            "services:\n  a: {command: x, port: 9000, replicas: 3}\n"
            "  b: {command: x, port: 9002}\n",
            "services.b.port (line 3): port 9002 (instance 1) is also services.a.port; "
            "instance N listens on port + N - 1",
            id="overlapping-ports",
        ),
        pytest.param(
            "services:\n  a: {command: x, port: 65535, replicas: 2}\n",
            "services.a.port (line 2): 2 instances from port 65535 go past 65535",
            id="ports-past-the-end",
        ),
        pytest.param(
            "root: nowhere\n",
            "root (line 1): no such folder",
            id="missing-root",
        ),
        pytest.param(
            "gateway: {config: missing.yaml}\n",
            "gateway.config (line 1): no such file",
            id="missing-gateway-config",
        ),
    ],
)
def test_checks_across_fields(text: str, expected: str, tmp_path: Path) -> None:
    found = issues(text, tmp_path)
    assert any(issue.startswith(expected) for issue in found), found


def test_every_problem_is_reported_at_once_in_line_order(tmp_path: Path) -> None:
    text = (
        "services:\n"
        "  users: {app: x:y, depends_on: [nobody]}\n"
        "  web: {command: z, migrate: true}\n"
        "  other: {}\n"
    )
    with pytest.raises(ConfigError) as caught:
        loads_system(text, tmp_path / "meshgate.yaml")
    lines = [i.line for i in caught.value.issues]
    assert lines == [2, 3, 4]
    assert str(caught.value).startswith(f"{tmp_path / 'meshgate.yaml'}: 3 problems in the config")


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no such file .*write a meshgate\.yaml"):
        load_system(tmp_path / "meshgate.yaml")


def test_the_gateway_configuration_is_validated_with_its_own_errors(tmp_path: Path) -> None:
    (tmp_path / "gw.yaml").write_text("gateway:\n  workrs: 2\n")
    with pytest.raises(ConfigError) as caught:
        loads_system("gateway: {config: gw.yaml}\n", tmp_path / "meshgate.yaml")
    assert caught.value.source == str(tmp_path / "gw.yaml")
    assert "gateway.workrs (line 2): unknown key 'workrs'" in str(caught.value)


def test_a_registry_that_services_need_must_be_enabled(tmp_path: Path) -> None:
    (tmp_path / "gw.yaml").write_text("gateway: {registry: {enabled: false}}\n")
    found = issues(
        "gateway: {config: gw.yaml}\nservices:\n  users: {app: x:y}\n  jobs: {command: z}\n",
        tmp_path,
    )
    expected = (
        "gateway.config (line 1): users register in the gateway's registry, which gw.yaml "
        "disables (gateway.registry.enabled: false); enable it"
    )
    assert found == [expected]


def test_routes_to_services_the_system_does_not_run_are_warned_about(tmp_path: Path) -> None:
    (tmp_path / "gw.yaml").write_text(
        "routes:\n  - {name: orders, match: {path_prefix: /orders}, service: orders}\n"
    )
    sf = loads_system("gateway: {config: gw.yaml}\n", tmp_path / "meshgate.yaml")
    expected = (
        "gw.yaml: routes[0] (orders) sends to service 'orders', which this system does not "
        "run; it answers 503 until an instance registers"
    )
    assert sf.warnings == (expected,)


def test_start_order_puts_dependencies_first_and_keeps_file_order(tmp_path: Path) -> None:
    sf = loads_system(
        "services:\n"
        "  web: {app: x:y, depends_on: [users, orders]}\n"
        "  orders: {app: x:y, depends_on: [users]}\n"
        "  users: {app: x:y}\n"
        "  search: {app: x:y}\n",
        tmp_path / "meshgate.yaml",
    )
    assert start_order(sf.system) == ["users", "orders", "web", "search"]


def test_readiness_and_registration_defaults(tmp_path: Path) -> None:
    sf = loads_system(
        "services:\n"
        "  app: {app: x:y}\n"
        "  server: {command: 'srv --port {port}'}\n"
        "  worker: {command: 'work'}\n"
        "  logged: {command: 'srv {port}', ready: {log: listening}}\n"
        "  hidden: {command: 'srv {port}', registry: false}\n",
        tmp_path / "meshgate.yaml",
    )
    services = sf.system.services
    assert readiness(services["server"]).tcp
    assert not readiness(services["worker"]).tcp
    assert not readiness(services["logged"]).tcp
    assert {n for n, s in services.items() if registers(s)} == {"app", "server"}


def test_placeholders() -> None:
    assert placeholders("{python} -m x --port {port} {{literal}}") == ["python", "port"]
    assert expand("{a}:{{b}}", {"a": "1"}) == "1:{b}"
    with pytest.raises(ValueError, match="Single '}'"):
        placeholders("a}")
