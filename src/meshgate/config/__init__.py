"""One declarative configuration model for meshgate, validated at load.

>>> from meshgate.config import load
>>> config = load("gateway.yaml")  # raises ConfigError naming every bad field
"""

from meshgate.config.loader import check, load, loads
from meshgate.config.model import (
    Address,
    Config,
    EndpointSettings,
    GatewaySettings,
    MatchSettings,
    RouteSettings,
    TimeoutSettings,
    UpstreamSettings,
)

__all__ = [
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
]
