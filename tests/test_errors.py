"""Every public error meshgate defines is a MeshgateError with a docstring, in one tree."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import meshgate
from meshgate.errors import MeshgateError

# Control flow inside the data plane that never reaches a caller.
_INTERNAL = {
    "meshgate.gateway.exchange.Reject",  # refuses the request being parsed
    "meshgate.gateway.resp.FollowUp",  # a Redis decision that sent another command
    "meshgate.gateway.filters._credentials.Refused",  # the auth filter's answer
    "meshgate.gateway.filters._credentials.NoKey",  # no key verifies: fetch the JWKS
}


def _modules() -> list[str]:
    names = [meshgate.__name__]
    for info in pkgutil.walk_packages(meshgate.__path__, prefix="meshgate."):
        if info.name.endswith("__main__"):
            continue
        names.append(info.name)
    return names


def test_every_public_error_is_a_documented_meshgate_error() -> None:
    found = {}
    for name in _modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if attr.startswith("_") or not inspect.isclass(value):
                continue
            if not issubclass(value, BaseException) or value.__module__ != name:
                continue
            found[f"{name}.{attr}"] = value
    assert len(found) > 20  # the walk reached the packages
    wrong = [
        path
        for path, cls in found.items()
        if path not in _INTERNAL and not issubclass(cls, MeshgateError)
    ]
    assert wrong == [], f"root these at MeshgateError: {wrong}"
    undocumented = [path for path, cls in found.items() if not (cls.__doc__ or "").strip()]
    assert undocumented == []


def test_each_package_keeps_its_errors_in_its_errors_module() -> None:
    strays = []
    for name in _modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (
                not attr.startswith("_")
                and inspect.isclass(value)
                and issubclass(value, MeshgateError)
                and value.__module__ == name
                and not name.endswith(".errors")
                and name != "meshgate.errors"
            ):
                strays.append(f"{name}.{attr}")
    assert strays == [], f"move these into their package's errors.py: {strays}"
