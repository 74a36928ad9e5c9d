"""Client addresses in one canonical form, wherever one is judged.

IP rules, trusted proxies, rate-limit keys, hashing and logs all see the same text for
the same client: an IPv4 client written as an IPv4-mapped IPv6 address
(``::ffff:10.1.2.3``, as a dual-stack listener or a proxy's ``X-Forwarded-For`` may
write it) is its IPv4 address, so that ``deny: 10.0.0.0/8`` holds for it.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

__all__ = ["Address", "canonical_ip", "parse_ip"]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@lru_cache(maxsize=8192)
def parse_ip(text: str) -> Address | None:
    """The address ``text`` names, IPv4-mapped IPv6 as IPv4; None if it names none.

    Accepts what proxies write in ``X-Forwarded-For``: surrounding spaces, an IPv6
    address in brackets, and a port after either (``[2001:db8::1]:443``,
    ``203.0.113.7:51234``). A zone (``fe80::1%eth0``) is not an address of a client.
    """
    value = text.strip()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        value = value[1:end]
    elif value.count(":") == 1:
        value = value.partition(":")[0]  # IPv4 with a port
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            return None
        mapped = address.ipv4_mapped
        if mapped is not None:
            return mapped
    return address


def canonical_ip(text: str) -> str | None:
    """``text`` as :func:`parse_ip` reads it, written in canonical form; None if it
    names no address."""
    address = parse_ip(text)
    return None if address is None else str(address)
