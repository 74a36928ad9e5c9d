"""The curated public API of the meshgate package."""

from __future__ import annotations

import re

import meshgate
import meshgate.config


def test_exported_members_of_meshgate() -> None:
    assert set(meshgate.__all__) == {"ConfigError", "MeshgateError", "__version__"}
    for name in meshgate.__all__:
        assert hasattr(meshgate, name)
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+)?", meshgate.__version__)


def test_exported_members_of_meshgate_config() -> None:
    assert set(meshgate.config.__all__) == {
        "Address",
        "Config",
        "EndpointSettings",
        "GatewaySettings",
        "MatchSettings",
        "RouteSettings",
        "TimeoutSettings",
        "UpstreamSettings",
        "check",
        "load",
        "loads",
    }
    for name in meshgate.config.__all__:
        member = getattr(meshgate.config, name)
        assert member.__module__.startswith("meshgate.config"), name
        assert (member.__doc__ or "").strip(), name


def test_the_model_module_still_offers_every_settings_class() -> None:
    # config.model is the face of the split modules: what code imported from it stays.
    from meshgate.config import model

    for name in model.__all__:
        member = getattr(model, name)
        if isinstance(member, type) or (callable(member) and hasattr(member, "__code__")):
            assert member.__module__.startswith("meshgate.config"), name
    assert {"RateLimitSettings", "UpstreamTlsSettings", "TracingSettings"} <= set(model.__all__)
