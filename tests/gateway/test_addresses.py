"""Client addresses in one canonical form."""

from __future__ import annotations

import ipaddress

import pytest

from meshgate.gateway.addresses import canonical_ip, parse_ip


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.1.2.3", "10.1.2.3"),
        (" 10.1.2.3 ", "10.1.2.3"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("::FFFF:10.1.2.3", "10.1.2.3"),
        ("::ffff:a01:203", "10.1.2.3"),
        ("0:0:0:0:0:ffff:0a01:0203", "10.1.2.3"),
        ("[::ffff:10.1.2.3]", "10.1.2.3"),
        ("[::ffff:10.1.2.3]:8443", "10.1.2.3"),
        ("10.1.2.3:51234", "10.1.2.3"),
        ("2001:DB8::1", "2001:db8::1"),
        ("[2001:db8:0:0::1]:443", "2001:db8::1"),
        ("::1", "::1"),
        # not addresses of a client
        ("fe80::1%eth0", None),
        ("unknown", None),
        ("", None),
        ("[::1", None),
        ("10.1.2.300", None),
        ("_hidden", None),
    ],
)
def test_canonical_ip(text: str, expected: str | None) -> None:
    assert canonical_ip(text) == expected


def test_a_mapped_address_is_in_its_ipv4_network() -> None:
    address = parse_ip("::ffff:10.9.9.9")
    assert address is not None
    assert address in ipaddress.ip_network("10.0.0.0/8")
