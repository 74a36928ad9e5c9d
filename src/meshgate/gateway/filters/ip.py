"""Client address allow and deny lists, and the mTLS requirement."""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from meshgate.config.model import IpFilterSettings
from meshgate.gateway.addresses import parse_ip
from meshgate.gateway.contract import BuildContext, FilterExchange, Verdict, reply

__all__ = ["IpFilter", "MtlsFilter", "client_address"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_address(exchange: FilterExchange, trusted: tuple[Network, ...]) -> str:
    """The client's address: from X-Forwarded-For when the peer is a trusted proxy
    (the rightmost address that is not itself a trusted proxy), else the peer's."""
    peer = exchange.client.peer_ip
    if not exchange.client.peer_trusted:
        return peer
    hops: list[str] = []
    for name, value in exchange.headers:
        if name.lower() == b"x-forwarded-for":
            hops.extend(h.strip().decode("latin-1") for h in value.split(b","))
    for hop in reversed(hops):
        address = parse_ip(hop)
        if address is None:
            return peer  # a malformed list is not believed
        if not any(address in net for net in trusted):
            return str(address)
    return peer


class IpFilter:
    """403 for denied addresses, and for any address outside a non-empty allow list."""

    name = "ip"

    def __init__(self, settings: IpFilterSettings, ctx: BuildContext) -> None:
        self._allow = settings.allow
        self._deny = settings.deny
        self._forwarded = settings.forwarded
        self._trusted = ctx.trusted_proxies
        self.permitted = lru_cache(maxsize=65536)(self._permitted)

    def _permitted(self, ip: str) -> bool:
        address = parse_ip(ip)
        if address is None:
            return False
        if any(address in net for net in self._deny):
            return False
        return not self._allow or any(address in net for net in self._allow)

    def request(self, exchange: FilterExchange) -> Verdict:
        ip = client_address(exchange, self._trusted) if self._forwarded else exchange.client.peer_ip
        if self.permitted(ip):
            return None
        return reply(exchange, 403, "forbidden_address", f"{ip} may not call this route")


class MtlsFilter:
    """Requires a client certificate that the listener verified (gateway.tls.client_ca)."""

    name = "mtls"

    def request(self, exchange: FilterExchange) -> Verdict:
        if exchange.client.peer_cert:
            return None
        return reply(
            exchange,
            401,
            "client_certificate_required",
            "this route needs a client certificate signed by the gateway's client CA",
        )
