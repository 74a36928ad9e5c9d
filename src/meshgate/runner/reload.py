"""What an edit of the system file means for a system that runs.

``meshgate up`` watches its system file. A valid new version is compared with the
one it runs (:func:`compare`), and then:

- ``replicas`` changes are applied at once (as ``meshgate scale`` would);
- other settings of a service (``env``, ``command``, ``port``, ``ready``...) and the
  system's ``env`` are taken for every instance that starts from then on (a restart
  after a crash, ``scale``, ``meshgate restart``); running instances keep theirs until
  ``meshgate restart SERVICE``;
- what the running processes are built around (the gateway, ``root``, ``name``,
  ``observability``, services added or removed, ``depends_on``) is not applied:
  ``up`` says that it needs a new ``up``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshgate.runner.model import ServiceSpec, System

__all__ = ["Change", "compare"]

_NEW_UP = ("name", "root", "gateway", "observability")
"""Top-level fields that only a new ``up`` applies."""


@dataclass
class Change:
    """The difference between the system that runs and a new version of its file."""

    system: System
    """The system to run from now on: the new version where it can be applied, the
    running one elsewhere."""
    replicas: dict[str, int] = field(default_factory=dict)
    """Services whose number of instances changed, with the new number."""
    restart: dict[str, list[str]] = field(default_factory=dict)
    """Services whose running instances keep old settings, with the changed fields."""
    new_up: list[str] = field(default_factory=list)
    """Changes not applied, that need a new ``up``."""

    @property
    def empty(self) -> bool:
        return not (self.replicas or self.restart or self.new_up)


def _fields(old: ServiceSpec, new: ServiceSpec) -> list[str]:
    return [
        name
        for name in type(old).model_fields
        if name not in ("replicas", "depends_on") and getattr(old, name) != getattr(new, name)
    ]


def compare(old: System, new: System) -> Change:
    """What applying ``new`` to a system running ``old`` does (see the module docstring)."""
    new_up = [key for key in _NEW_UP if getattr(old, key) != getattr(new, key)]
    added = sorted(new.services.keys() - old.services.keys())
    removed = sorted(old.services.keys() - new.services.keys())
    if added:
        new_up.append(f"services added ({', '.join(added)})")
    if removed:
        new_up.append(f"services removed ({', '.join(removed)})")
    services = dict(old.services)
    replicas: dict[str, int] = {}
    restart: dict[str, list[str]] = {}
    for name, before in old.services.items():
        after = new.services.get(name)
        if after is None or after == before:
            continue
        if after.depends_on != before.depends_on:
            new_up.append(f"services.{name}.depends_on")
            after = after.model_copy(update={"depends_on": before.depends_on})
        if after.replicas != before.replicas:
            replicas[name] = after.replicas
        changed = _fields(before, after)
        if changed:
            restart[name] = changed
        services[name] = after
    if new.env != old.env:
        for name in services:
            restart.setdefault(name, []).insert(0, "env (of the system)")
    system = old.model_copy(update={"services": services, "env": new.env, "examples": new.examples})
    return Change(system, replicas, restart, new_up)
