"""The declarative configuration model: YAML in, frozen typed models out.

Every model forbids unknown keys and is immutable once built. Values users write
as text (addresses, durations, sizes) are parsed here, once, so that nothing
downstream parses them again. Cross-field checks that need the whole document
(dangling references, duplicates, unreachable routes) live in
:func:`meshgate.config.loader.check`.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from meshgate.config._base import Address, Duration, Name, Size, _Model, parse_duration, parse_size
from meshgate.config.gateway import (
    AccessLogSettings,
    AdminSettings,
    CertificateSettings,
    GatewaySettings,
    LimitsSettings,
    RegistrySettings,
    TlsSettings,
    TracingSettings,
)
from meshgate.config.policies import (
    ApiKeySettings,
    AuthSettings,
    ConsumerSettings,
    CorsSettings,
    HeaderPolicySettings,
    HeaderRules,
    IpFilterSettings,
    JwtKeySettings,
    JwtSettings,
    RateLimitSettings,
    RequestHeaderRules,
    parse_rate,
)
from meshgate.config.routes import HeaderMatch, MatchSettings, RouteSettings, RouteTracingSettings
from meshgate.config.upstreams import (
    ActiveHealthSettings,
    CircuitBreakerSettings,
    EndpointSettings,
    HashSettings,
    HealthSettings,
    PassiveHealthSettings,
    RetryBudgetSettings,
    RetrySettings,
    SharedHealthSettings,
    StickySettings,
    TimeoutSettings,
    UpstreamSettings,
    UpstreamTlsSettings,
)

__all__ = [
    "AccessLogSettings",
    "ActiveHealthSettings",
    "Address",
    "AdminSettings",
    "ApiKeySettings",
    "AuthSettings",
    "CertificateSettings",
    "CircuitBreakerSettings",
    "Config",
    "ConsumerSettings",
    "CorsSettings",
    "Duration",
    "EndpointSettings",
    "GatewaySettings",
    "HashSettings",
    "HeaderMatch",
    "HeaderPolicySettings",
    "HeaderRules",
    "HealthSettings",
    "IpFilterSettings",
    "JwtKeySettings",
    "JwtSettings",
    "LimitsSettings",
    "MatchSettings",
    "Name",
    "PassiveHealthSettings",
    "RateLimitSettings",
    "RegistrySettings",
    "RequestHeaderRules",
    "RetryBudgetSettings",
    "RetrySettings",
    "RouteSettings",
    "RouteTracingSettings",
    "SharedHealthSettings",
    "Size",
    "StickySettings",
    "TimeoutSettings",
    "TlsSettings",
    "TracingSettings",
    "UpstreamSettings",
    "UpstreamTlsSettings",
    "parse_duration",
    "parse_rate",
    "parse_size",
]


class Config(_Model):
    """A whole gateway configuration file.

    Routes that name a ``service`` get the upstream of that name, added with
    default settings when the file has none (what ``GET /config`` shows).
    """

    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    """The gateway process."""
    upstreams: dict[Name, UpstreamSettings] = Field(default_factory=dict)
    """Upstreams by name."""
    consumers: dict[Name, ConsumerSettings] = Field(default_factory=dict)
    """API consumers by name, with their hashed keys."""
    routes: tuple[RouteSettings, ...] = ()
    """Routes; see the routing docs for the order in which they are tried."""

    @model_validator(mode="after")
    def _service_upstreams(self) -> Config:
        missing = {
            r.service: UpstreamSettings(service=r.service)
            for r in self.routes
            if r.service is not None and r.service not in self.upstreams
        }
        if missing:
            # Frozen, but still being built: the implicit upstreams join the others.
            object.__setattr__(self, "upstreams", {**self.upstreams, **missing})
        return self

    @classmethod
    def from_dict(cls, data: Any) -> Config:
        """Validate a parsed document; see :func:`meshgate.config.load` for errors."""
        return cls.model_validate(data)
