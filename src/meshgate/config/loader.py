"""Loading a configuration: YAML text -> validated :class:`Config`, or a :class:`ConfigError`.

Every problem is reported at once, each with the path of the field
(``routes[2].upstream``), its line in the file, and the fix. Nothing here ever
lets a traceback reach the user for bad input.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from meshgate.config.model import Config
from meshgate.errors import ConfigError, ConfigIssue
from meshgate.routing import covers, precedence_key

__all__ = [
    "boolean_key_issue",
    "check",
    "format_path",
    "load",
    "loads",
    "locate",
    "parse_document",
    "translate",
]


def load(path: str | Path) -> Config:
    """Read and validate a configuration file.

    Raises:
        ConfigError: the file is missing, not YAML, or not a valid configuration.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            [ConfigIssue("", f"no such file {str(path)!r}; check the path")], str(path)
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue("", f"cannot read the file: {exc}")], str(path)) from None
    return loads(text, source=str(path))


def parse_document(
    text: str, source: str | None, keys: str
) -> tuple[dict[str, Any], yaml.Node | None]:
    """The YAML mapping in ``text`` and its node tree (for line numbers); an empty
    document is an empty mapping.

    Raises:
        ConfigError: not YAML (with the line), or not a mapping (of ``keys``).
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            [ConfigIssue("", f"not valid YAML: {problem}; fix the syntax", line)], source
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [ConfigIssue("", f"the document must be a mapping with {keys}", 1)], source
        )
    return data, node


def loads(text: str, source: str | None = None) -> Config:
    """Validate a configuration given as YAML text; ``source`` names it in errors."""
    data, node = parse_document(text, source, "gateway, upstreams, routes")
    try:
        config = Config.from_dict(data)
    except ValidationError as exc:
        issues = [
            translate(err, node, Config, _missing_hint) for err in exc.errors(include_url=False)
        ]
        raise ConfigError(_sorted(_dedupe(issues)), source) from None
    issues = list(check(config))
    if issues:
        raise ConfigError(_sorted([locate(i, node) for i in issues]), source)
    return config


def check(config: Config) -> Iterable[ConfigIssue]:
    """Cross-field problems: dangling references, duplicate names and API keys,
    auth that protects nothing, unreachable routes."""
    upstreams = sorted(config.upstreams)
    seen: dict[str, int] = {}
    for i, route in enumerate(config.routes):
        if route.name in seen:
            yield ConfigIssue(
                f"routes[{i}].name",
                f"route name {route.name!r} is already used by routes[{seen[route.name]}]; "
                "give each route a unique name",
            )
        else:
            seen[route.name] = i
        if route.upstream not in config.upstreams:
            yield ConfigIssue(
                f"routes[{i}].upstream",
                f"no upstream named {route.upstream!r}{_suggest(route.upstream, upstreams)}; "
                f"known: {', '.join(upstreams) or '(none: add one under upstreams)'}",
            )
    for i, route in enumerate(config.routes):
        target = config.upstreams.get(route.upstream)
        if route.service is not None and target is not None and target.service != route.service:
            yield ConfigIssue(
                f"routes[{i}].service",
                f"upstream {route.upstream!r} does not take its endpoints from service "
                f"{route.service!r}; give it service: {route.service}, or route to it "
                "with upstream: instead",
            )
    registry = config.gateway.registry
    for name, upstream in config.upstreams.items():
        if upstream.service is not None and not registry.enabled:
            yield ConfigIssue(
                f"upstreams.{name}.service",
                "service endpoints come from the registry, which is disabled; set "
                "gateway.registry.enabled: true or list the endpoints",
            )
    for name, upstream in config.upstreams.items():
        addresses: dict[str, int] = {}
        for j, endpoint in enumerate(upstream.endpoints):
            key = str(endpoint.address)
            if key in addresses:
                yield ConfigIssue(
                    f"upstreams.{name}.endpoints[{j}]",
                    f"endpoint {key} is listed twice (also endpoints[{addresses[key]}]); "
                    "use weight to give it more traffic",
                )
            addresses[key] = j
    tls = config.gateway.tls
    for i, route in enumerate(config.routes):
        if route.mtls and (tls is None or tls.client_ca is None):
            yield ConfigIssue(
                f"routes[{i}].mtls",
                "mtls needs client certificates to check: set gateway.tls.client_ca",
            )
        if route.auth is not None and route.auth.api_key is not None and not config.consumers:
            yield ConfigIssue(
                f"routes[{i}].auth.api_key",
                "API keys belong to consumers, and none is configured: add consumers "
                "with api_keys (meshgate hash-key prints a key's stored form)",
            )
        auth = route.auth
        if auth is not None and auth.anonymous and (auth.scopes or auth.roles):
            # Anonymous callers are never checked against scopes and roles, so a caller
            # refused for lacking one would pass by sending no credentials at all.
            yield ConfigIssue(
                f"routes[{i}].auth",
                "anonymous: true lets callers without credentials through unchecked, so "
                "scopes and roles would protect nothing; remove anonymous to require "
                "them, or remove scopes and roles to make the route public",
            )
    yield from _duplicate_api_keys(config)
    yield from _unreachable(config)
    if config.gateway.admin.listen == config.gateway.listen and config.gateway.listen.port:
        yield ConfigIssue(
            "gateway.admin.listen",
            f"the admin listener {config.gateway.admin.listen} is the same as gateway.listen; "
            "give it its own port",
        )


def _duplicate_api_keys(config: Config) -> Iterable[ConfigIssue]:
    owners: dict[str, tuple[str, int]] = {}
    for name, consumer in config.consumers.items():
        for j, key in enumerate(consumer.api_keys):
            first = owners.setdefault(key, (name, j))
            if first[0] != name:
                yield ConfigIssue(
                    f"consumers.{name}.api_keys[{j}]",
                    f"consumers {first[0]!r} and {name!r} have the same API key (also "
                    f"consumers.{first[0]}.api_keys[{first[1]}]), so a caller with it could "
                    "not be told apart; give each consumer its own key (meshgate hash-key "
                    "makes one)",
                )


def _unreachable(config: Config) -> Iterable[ConfigIssue]:
    order = sorted(range(len(config.routes)), key=lambda i: precedence_key(config.routes[i], i))
    for pos, j in enumerate(order):
        later = config.routes[j]
        for i in order[:pos]:
            earlier = config.routes[i]
            if covers(earlier.match, later.match):
                yield ConfigIssue(
                    f"routes[{j}]",
                    f"route {later.name!r} can never match: route {earlier.name!r} "
                    f"(routes[{i}]) is tried first and takes every request it would; "
                    "narrow the earlier route's match, or give this one a higher priority",
                )
                break


def _suggest(word: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def format_path(loc: Sequence[int | str]) -> str:
    """``("routes", 2, "upstream")`` -> ``routes[2].upstream``."""
    out = ""
    for part in loc:
        if isinstance(part, bool):  # a YAML key read as a boolean (on, yes, ...)
            out += f".{str(part).lower()}"
        elif isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _model_for(root: type[BaseModel], loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The model class under ``root`` that holds the last field of ``loc``, to list its
    allowed keys."""
    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        if field is None:
            # A dict of models: the key is a user-chosen name; stay on the value type.
            continue
        model = _inner_model(field.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _inner_model(annotation: Any) -> Any:
    args = getattr(annotation, "__args__", None)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in args or ():
        inner = _inner_model(arg)
        if inner is not None:
            return inner
    return None


def boolean_key_issue(err: Any, node: yaml.Node | None) -> ConfigIssue | None:
    """The issue for a key YAML read as a boolean (unquoted on, off, yes, no): pydantic
    reports it at ``(..., key, "[key]")`` in a dict field and as an ``invalid_key`` at
    ``(..., key)`` in a model; None for any other error."""
    raw = list(err["loc"])
    if not raw or not isinstance(err.get("input"), bool):
        return None
    if raw[-1] == "[key]":
        parent = raw[:-2]
    elif err["type"] == "invalid_key":
        parent = raw[:-1]
    else:
        return None
    word = str(err["input"]).lower()
    loc = [p for p in parent if isinstance(p, int) or ("[" not in p and "-" not in p)]
    message = (
        f"a key was read as {word}: YAML reads unquoted on, off, yes and no as "
        "booleans; quote the key or check its spelling"
    )
    return ConfigIssue(
        format_path([*loc, word]), message, _boolean_key_line(node, loc, err["input"])
    )


def _boolean_key_line(
    node: yaml.Node | None, parent: Sequence[int | str], value: bool
) -> int | None:
    """The line of the key in the mapping at ``parent`` that YAML read as ``value``."""
    for part in parent:
        if isinstance(node, yaml.MappingNode):
            node = next(
                (v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part),
                None,
            )
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            node = node.value[part] if 0 <= part < len(node.value) else None
    if isinstance(node, yaml.MappingNode):
        for key, _ in node.value:
            if key.tag == "tag:yaml.org,2002:bool" and yaml.safe_load(key.value) is value:
                return int(key.start_mark.line) + 1
    return _line_of(node, []) if node is not None else None


_PYDANTIC_TAGS = frozenset({"json-or-python", "lax-or-strict", "tagged-union", "function-after"})


def _pydantic_tag(part: str) -> bool:
    """Whether a location part is pydantic's (``function-after[...]``, a union
    member's type), not a key of the document (``user-admin`` is one)."""
    return "[" in part or part in _PYDANTIC_TAGS


def translate(
    err: Any,
    node: yaml.Node | None,
    root: type[BaseModel],
    missing: Callable[[Sequence[int | str]], str | None] | None = None,
) -> ConfigIssue:
    """A pydantic error of a document validated as ``root`` as an issue that names the
    field, its line and the fix. ``missing`` may give a better hint for a missing
    field than "add it"."""
    boolean = boolean_key_issue(err, node)
    if boolean is not None:
        return boolean
    # pydantic adds "function-after[...]" or type names to the location of
    # validators; they mean nothing to the user.
    loc = [p for p in err["loc"] if isinstance(p, int) or not _pydantic_tag(p)]
    path = format_path(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        model = _model_for(root, loc)
        allowed = sorted(model.model_fields) if model is not None else []
        key = str(loc[-1])
        message = f"unknown key {key!r}{_suggest(key, allowed)}; allowed keys: {', '.join(allowed)}"
    elif kind == "missing":
        hint = missing(loc) if missing is not None else None
        message = hint or "this field is required; add it"
    else:
        message = str(err["msg"])
        message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if "input" in err and kind != "value_error" and not isinstance(err["input"], dict | list):
            message = f"{message} (got {err['input']!r})"
    return ConfigIssue(path, message, _line_of(node, loc))


def _missing_hint(loc: Sequence[int | str]) -> str | None:
    if loc[0] == "routes" and loc[-1] == "upstream":
        return (
            "this field is required; add it (a name under upstreams), "
            "or give service: (a name in the registry)"
        )
    return None


def locate(issue: ConfigIssue, node: yaml.Node | None) -> ConfigIssue:
    """``issue`` with the line of its field in the document ``node``."""
    return ConfigIssue(issue.path, issue.message, _line_of(node, _parse_path(issue.path)))


def _parse_path(path: str) -> list[int | str]:
    out: list[int | str] = []
    for part in path.replace("[", ".[").split("."):
        if not part:
            continue
        if part.startswith("[") and part.endswith("]") and part[1:-1].isdigit():
            out.append(int(part[1:-1]))
        else:
            out.append(part)
    return out


def _line_of(node: yaml.Node | None, loc: Sequence[int | str]) -> int | None:
    best = node
    last = len(loc) - 1
    for depth, part in enumerate(loc):
        if node is None:
            break
        nxt: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    # An unknown key is best pointed at by the key itself. Compare
                    # positions, not names: an upstream may be called "balancer".
                    nxt = value if depth != last else key
                    break
        elif (
            isinstance(node, yaml.SequenceNode)
            and isinstance(part, int)
            and 0 <= part < len(node.value)
        ):
            nxt = node.value[part]
        node = nxt
        if node is not None:
            best = node
    return best.start_mark.line + 1 if best is not None else None


def _dedupe(issues: Sequence[ConfigIssue]) -> list[ConfigIssue]:
    seen: set[tuple[str, str]] = set()
    out = []
    for issue in issues:
        key = (issue.path, issue.message)
        if key not in seen:
            seen.add(key)
            out.append(issue)
    return out


def _sorted(issues: Sequence[ConfigIssue]) -> list[ConfigIssue]:
    return sorted(issues, key=lambda i: (i.line is None, i.line or 0))
