"""TLS over real sockets: termination on the listener (SNI, versions, ALPN, mTLS,
certificate reload), the HTTP -> HTTPS redirect listener, and TLS to upstreams.

Certificates come from throwaway CAs made with trustme; clients are the standard
``ssl`` module driven through asyncio streams.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from meshgate.config import loads
from meshgate.config.model import UpstreamTlsSettings
from meshgate.errors import ConfigError
from meshgate.gateway.tls import upstream_context
from meshgate.gateway.upstream.probe import Prober, probe_once
from meshgate.gateway.worker import Worker, listen_socket
from tests.helpers import Client, Message, RawUpstream, build_request, response, run_gateway

API = "api.example.test"
ADMIN = "admin.example.test"
WILD = "*.wild.test"


@dataclass(frozen=True)
class Leaf:
    """A certificate and key written to disk, and the certificate's DER bytes."""

    cert: str
    key: str
    der: bytes
    leaf: trustme.LeafCert


@dataclass
class Pki:
    """Throwaway CAs and certificates for one test, as PEM files under tmp_path."""

    root: Path
    ca: trustme.CA  # signs the gateway's and the upstreams' certificates
    client_ca: trustme.CA  # signs client certificates (mTLS)
    other_ca: trustme.CA  # trusted by nobody
    count: int = 0

    def _write(self, leaf: trustme.LeafCert) -> Leaf:
        self.count += 1
        cert = self.root / f"leaf{self.count}.pem"
        key = self.root / f"leaf{self.count}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
        return Leaf(str(cert), str(key), der, leaf)

    def issue(self, *names: str, ca: trustme.CA | None = None) -> Leaf:
        return self._write((ca or self.ca).issue_cert(*names))

    def ca_file(self, ca: trustme.CA) -> str:
        path = self.root / f"ca-{id(ca)}.pem"
        ca.cert_pem.write_to_path(str(path))
        return str(path)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path, trustme.CA(), trustme.CA(), trustme.CA())


@dataclass(frozen=True)
class Certs:
    """The gateway's three certificates: api (the default), admin and a wildcard."""

    api: Leaf
    admin: Leaf
    wild: Leaf

    def settings(self) -> list[dict[str, Any]]:
        return [
            {"cert": self.api.cert, "key": self.api.key, "hosts": [API]},
            {"cert": self.admin.cert, "key": self.admin.key, "hosts": [ADMIN]},
            {"cert": self.wild.cert, "key": self.wild.key, "hosts": [WILD]},
        ]


@pytest.fixture
def certs(pki: Pki) -> Certs:
    return Certs(pki.issue(API), pki.issue(ADMIN), pki.issue(WILD))


def config(
    upstream: str,
    *,
    tls: dict[str, Any] | None = None,
    routes: list[dict[str, Any]] | None = None,
    upstream_tls: dict[str, Any] | None = None,
    **gateway: Any,
) -> str:
    """A configuration document (JSON, which is YAML) with one upstream ``up``."""
    gw: dict[str, Any] = {"listen": "127.0.0.1:0", "access_log": {"enabled": False}, **gateway}
    if tls is not None:
        gw["tls"] = tls
    up: dict[str, Any] = {"endpoints": [upstream]}
    if upstream_tls is not None:
        up["tls"] = upstream_tls
    doc = {
        "gateway": gw,
        "upstreams": {"up": up},
        "routes": routes or [{"name": "all", "upstream": "up"}],
    }
    return json.dumps(doc)


def client_context(
    pki: Pki,
    *,
    check_hostname: bool = True,
    maximum: ssl.TLSVersion | None = None,
    cert: Leaf | None = None,
    alpn: list[str] | None = None,
) -> ssl.SSLContext:
    """A client context that trusts the gateway's CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    pki.ca.configure_trust(context)
    context.check_hostname = check_hostname
    if maximum is not None and maximum < ssl.TLSVersion.TLSv1_2:
        # OpenSSL 3 does not even offer TLS 1.0/1.1 at the default security level;
        # lower it so that the server is the one refusing. Python deprecates
        # these versions, which is the point of the test.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = maximum
    elif maximum is not None:
        context.maximum_version = maximum
    if cert is not None:
        cert.leaf.configure_cert(context)
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


def handshake_version(client: ssl.SSLContext, server: ssl.SSLContext) -> str | None:
    """The version two contexts agree on, shaking hands in memory (no gateway)."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    near = client.wrap_bio(client_in, client_out, server_hostname=API)
    far = server.wrap_bio(server_in, server_out, server_side=True)
    for _ in range(10):
        done = 0
        for side in (near, far):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if done == 2:
            return near.version()
    return None


async def tls_connect(
    port: int, context: ssl.SSLContext, server_hostname: str | None = API
) -> Client:
    """A TLS client connection; ``server_hostname=""`` sends no SNI."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=server_hostname),
        5,
    )
    return Client(reader, writer)


def ssl_object(client: Client) -> ssl.SSLObject:
    obj = client.writer.get_extra_info("ssl_object")
    assert obj is not None
    return obj  # type: ignore[no-any-return]


def peer_der(client: Client) -> bytes:
    der = ssl_object(client).getpeercert(binary_form=True)
    assert der is not None
    return der


async def refused(port: int, context: ssl.SSLContext, server_hostname: str = API) -> None:
    """Assert that the gateway refuses the TLS session and no HTTP response arrives.

    With TLS 1.3 the server checks a client certificate after the client has
    finished its side of the handshake, so the refusal may only show on first read.
    """
    try:
        client = await tls_connect(port, context, server_hostname)
    except (ssl.SSLError, ConnectionError):
        return
    try:
        await client.send(build_request("GET", "/refused"))
        with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
            await client.read(timeout=5)
    finally:
        client.writer.transport.abort()


# ---------------------------------------------------------------------------- SNI


@pytest.mark.parametrize(
    ("server_hostname", "expected"),
    [
        (API, "api"),
        (ADMIN, "admin"),
        ("ADMIN.Example.Test", "admin"),  # names are case-insensitive
        ("x.wild.test", "wild"),
        ("wild.test", "api"),  # a wildcard does not cover its parent
        ("unknown.example.test", "api"),  # unknown: the first certificate
        ("", "api"),  # no SNI at all: the first certificate
    ],
)
@pytest.mark.parametrize("maximum", [None, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
async def test_sni_selects_the_certificate(
    pki: Pki, certs: Certs, server_hostname: str, expected: str, maximum: ssl.TLSVersion | None
) -> None:
    up = await RawUpstream().start()
    async with run_gateway(config(up.address, tls={"certificates": certs.settings()})) as (
        _,
        port,
    ):
        context = client_context(pki, check_hostname=False, maximum=maximum)
        client = await tls_connect(port, context, server_hostname)
        assert peer_der(client) == getattr(certs, expected).der
        # The certificate is what its SAN says it is.
        peer = ssl_object(client).getpeercert()
        assert peer is not None
        assert peer["subjectAltName"] == (
            ("DNS", {"api": API, "admin": ADMIN, "wild": WILD}[expected]),
        )
        assert (await client.request("GET", "/sni", host=server_hostname or API)).status == 200
        await client.close()
    await up.close()


async def test_sni_certificate_passes_hostname_verification(pki: Pki, certs: Certs) -> None:
    up = await RawUpstream().start()
    async with run_gateway(config(up.address, tls={"certificates": certs.settings()})) as (
        _,
        port,
    ):
        for name in (API, ADMIN, "deep.wild.test"):
            client = await tls_connect(port, client_context(pki), name)
            assert (await client.request("GET", "/", host=name)).status == 200
            await client.close()
    await up.close()


# ---------------------------------------------------------------------------- versions


@pytest.mark.parametrize(
    ("min_version", "client_max", "negotiated"),
    [
        ("1.2", ssl.TLSVersion.TLSv1_1, None),
        ("1.2", ssl.TLSVersion.TLSv1_2, "TLSv1.2"),
        ("1.2", None, "TLSv1.3"),
        ("1.3", ssl.TLSVersion.TLSv1_2, None),
        ("1.3", None, "TLSv1.3"),
    ],
    ids=["1.1-refused", "1.2-accepted", "1.3-preferred", "1.2-refused-by-1.3", "1.3-only"],
)
async def test_minimum_tls_version(
    pki: Pki,
    certs: Certs,
    min_version: str,
    client_max: ssl.TLSVersion | None,
    negotiated: str | None,
) -> None:
    up = await RawUpstream().start()
    tls = {"certificates": certs.settings(), "min_version": min_version}
    async with run_gateway(config(up.address, tls=tls)) as (_, port):
        context = client_context(pki, maximum=client_max)
        if negotiated is None:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await tls_connect(port, context)
        else:
            client = await tls_connect(port, context)
            assert ssl_object(client).version() == negotiated
            assert (await client.request("GET", "/v")).status == 200
            await client.close()
    assert all(r.target == "/v" for r in up.requests)
    await up.close()


async def test_the_tls11_client_really_offers_tls11(pki: Pki, certs: Certs) -> None:
    # Without this, the refusal above could be the client's own OpenSSL declining.
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server.minimum_version = ssl.TLSVersion.TLSv1
    certs.api.leaf.configure_cert(server)
    client = client_context(pki, maximum=ssl.TLSVersion.TLSv1_1)
    assert handshake_version(client, server) == "TLSv1.1"


async def test_reload_raises_the_minimum_version(pki: Pki, certs: Certs) -> None:
    up = await RawUpstream().start()
    async with run_gateway(config(up.address, tls={"certificates": certs.settings()})) as (
        worker,
        port,
    ):
        tls12 = client_context(pki, maximum=ssl.TLSVersion.TLSv1_2)
        client = await tls_connect(port, tls12)
        await client.close()
        tls = {"certificates": certs.settings(), "min_version": "1.3"}
        worker.apply(loads(config(up.address, tls=tls), "new.yaml"))
        for name in (API, ADMIN):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await tls_connect(port, tls12, name)
            client = await tls_connect(port, client_context(pki), name)
            assert ssl_object(client).version() == "TLSv1.3"
            await client.close()
    await up.close()


async def test_alpn_negotiates_http11(pki: Pki, certs: Certs) -> None:
    up = await RawUpstream().start()
    async with run_gateway(config(up.address, tls={"certificates": certs.settings()})) as (
        _,
        port,
    ):
        client = await tls_connect(port, client_context(pki, alpn=["h2", "http/1.1"]))
        assert ssl_object(client).selected_alpn_protocol() == "http/1.1"
        await client.close()
    await up.close()


async def test_request_over_tls_reaches_plain_upstream_as_https(pki: Pki, certs: Certs) -> None:
    up = await RawUpstream().start()
    async with run_gateway(config(up.address, tls={"certificates": certs.settings()})) as (
        _,
        port,
    ):
        client = await tls_connect(port, client_context(pki))
        res = await client.request("POST", "/over-tls?q=1", body=b"secret", host=API)
        assert res.status == 200
        assert res.body == b"/over-tls?q=1"
        # Keep-alive works over TLS too.
        assert (await client.request("GET", "/again", host=API)).status == 200
        await client.close()
    seen = up.requests[0]
    assert seen.body == b"secret"
    assert seen.header("X-Forwarded-Proto") == "https"
    assert seen.header("Forwarded") == f'for=127.0.0.1;proto=https;host="{API}"'
    assert [r.target for r in up.requests] == ["/over-tls?q=1", "/again"]
    await up.close()


# ---------------------------------------------------------------------------- mTLS


def mtls_config(pki: Pki, certs: Certs, upstream: str, client_ca: trustme.CA | None = None) -> str:
    ca = pki.ca_file(client_ca or pki.client_ca)
    tls = {"certificates": certs.settings(), "client_ca": ca}
    routes: list[dict[str, Any]] = [
        {"name": "secure", "upstream": "up", "match": {"path_prefix": "/secure"}, "mtls": True},
        {"name": "open", "upstream": "up", "match": {"path_prefix": "/open"}},
    ]
    return config(upstream, tls=tls, routes=routes)


async def test_mtls_route_refuses_a_client_without_certificate(pki: Pki, certs: Certs) -> None:
    up = await RawUpstream().start()
    async with run_gateway(mtls_config(pki, certs, up.address)) as (_, port):
        client = await tls_connect(port, client_context(pki))
        res = await client.request("GET", "/secure/data", host=API)
        assert res.status == 401
        assert json.loads(res.body)["error"] == "client_certificate_required"
        # The same client (same connection) may use a route without mtls.
        assert (await client.request("GET", "/open/data", host=API)).status == 200
        await client.close()
        # Also when it asks for another certificate by SNI.
        client = await tls_connect(port, client_context(pki), ADMIN)
        assert (await client.request("GET", "/secure/data", host=ADMIN)).status == 401
        await client.close()
    assert [r.target for r in up.requests] == ["/open/data"]
    await up.close()


@pytest.mark.parametrize("server_hostname", [API, ADMIN, "x.wild.test", ""])
async def test_mtls_route_serves_a_client_certificate_from_the_client_ca(
    pki: Pki, certs: Certs, server_hostname: str
) -> None:
    up = await RawUpstream().start()
    leaf = pki.issue("client.example.test", ca=pki.client_ca)
    async with run_gateway(mtls_config(pki, certs, up.address)) as (_, port):
        context = client_context(pki, cert=leaf, check_hostname=False)
        client = await tls_connect(port, context, server_hostname)
        res = await client.request("GET", "/secure/data", host=server_hostname or API)
        assert res.status == 200
        assert (await client.request("GET", "/open/data", host=API)).status == 200
        await client.close()
    assert [r.target for r in up.requests] == ["/secure/data", "/open/data"]
    await up.close()


@pytest.mark.parametrize("maximum", [None, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
async def test_client_certificate_from_another_ca_fails_the_handshake(
    pki: Pki, certs: Certs, maximum: ssl.TLSVersion | None
) -> None:
    up = await RawUpstream().start()
    stranger = pki.issue("client.example.test", ca=pki.other_ca)
    async with run_gateway(mtls_config(pki, certs, up.address)) as (worker, port):
        await refused(port, client_context(pki, cert=stranger, maximum=maximum))
        await refused(port, client_context(pki, cert=stranger, maximum=maximum), ADMIN)
        # The listener keeps serving everyone else.
        good = await tls_connect(port, client_context(pki))
        assert (await good.request("GET", "/open/x", host=API)).status == 200
        await good.close()
        assert not worker.inflight
    assert [r.target for r in up.requests] == ["/open/x"]
    await up.close()


# ---------------------------------------------------------------------------- reload


@pytest.mark.parametrize("name", [API, ADMIN], ids=["default-certificate", "sni-certificate"])
async def test_reload_serves_the_new_certificate(pki: Pki, certs: Certs, name: str) -> None:
    up = await RawUpstream().start()
    tls = {"certificates": certs.settings()}
    async with run_gateway(config(up.address, tls=tls)) as (worker, port):
        old = certs.api if name == API else certs.admin
        kept = await tls_connect(port, client_context(pki), name)
        assert peer_der(kept) == old.der

        new = pki.issue(name)
        settings = certs.settings()
        settings[0 if name == API else 1].update(cert=new.cert, key=new.key)
        worker.apply(loads(config(up.address, tls={"certificates": settings}), "new.yaml"))

        client = await tls_connect(port, client_context(pki), name)
        assert peer_der(client) == new.der
        assert (await client.request("GET", "/new", host=name)).status == 200
        await client.close()
        # The other names keep their certificates.
        other = ADMIN if name == API else API
        client = await tls_connect(port, client_context(pki), other)
        assert peer_der(client) == (certs.admin if name == API else certs.api).der
        await client.close()
        # No connection was dropped: the one opened before the reload still serves.
        assert (await kept.request("GET", "/kept", host=name)).status == 200
        await kept.close()
    await up.close()


@pytest.mark.parametrize("name", [API, ADMIN])
async def test_reload_rereads_certificates_renewed_in_place(
    pki: Pki, certs: Certs, name: str
) -> None:
    # Renewal tools (certbot, cert-manager) replace the files under the same paths.
    up = await RawUpstream().start()
    text = config(up.address, tls={"certificates": certs.settings()})
    async with run_gateway(text) as (worker, port):
        old = certs.api if name == API else certs.admin
        client = await tls_connect(port, client_context(pki), name)
        assert peer_der(client) == old.der
        await client.close()
        renewed = pki.issue(name)
        renewed.leaf.cert_chain_pems[0].write_to_path(old.cert)
        renewed.leaf.private_key_pem.write_to_path(old.key)
        worker.apply(loads(text, "same.yaml"))  # the same configuration
        client = await tls_connect(port, client_context(pki), name)
        assert peer_der(client) == renewed.der
        await client.close()
    await up.close()


@pytest.mark.parametrize(
    ("index", "field", "problem"),
    [
        (0, "cert", "missing"),
        (1, "key", "missing"),
        (0, "key", "mismatched"),
        (2, "cert", "mismatched"),
    ],
)
async def test_reload_with_a_bad_certificate_keeps_the_old_ones(
    pki: Pki, certs: Certs, index: int, field: str, problem: str
) -> None:
    up = await RawUpstream().start()
    async with run_gateway(config(up.address, tls={"certificates": certs.settings()})) as (
        worker,
        port,
    ):
        settings = certs.settings()
        # New certificates everywhere, and one bad file.
        for entry, names in zip(settings, ([API], [ADMIN], [WILD]), strict=True):
            fresh = pki.issue(*names)
            entry.update(cert=fresh.cert, key=fresh.key)
        if problem == "missing":
            settings[index][field] = str(pki.root / "no-such-file.pem")
        else:
            # A cert and a key that do not belong together.
            settings[index][field] = getattr(pki.issue("someone.else.test"), field)
        with pytest.raises(ConfigError) as info:
            worker.apply(loads(config(up.address, tls={"certificates": settings}), "bad.yaml"))
        assert f"gateway.tls.certificates[{index}]" in str(info.value)
        assert worker.reloads == 0

        for name, leaf in ((API, certs.api), (ADMIN, certs.admin), ("x.wild.test", certs.wild)):
            client = await tls_connect(port, client_context(pki), name)
            assert peer_der(client) == leaf.der, name
            assert (await client.request("GET", "/still", host=name)).status == 200
            await client.close()
    await up.close()


async def mtls_status(port: int, context: ssl.SSLContext, server_hostname: str) -> int | None:
    """The status of a request to the mtls route; None when the handshake is refused."""
    try:
        client = await tls_connect(port, context, server_hostname)
        res = await client.request("GET", "/secure/x", host=server_hostname or API)
    except (ssl.SSLError, ConnectionError, EOFError):
        return None
    await client.close()
    return res.status


@pytest.mark.parametrize("server_hostname", [API, ADMIN, ""], ids=["default", "sni", "no-sni"])
async def test_reload_rotating_the_client_ca(pki: Pki, certs: Certs, server_hostname: str) -> None:
    up = await RawUpstream().start()
    retired = pki.issue("old.client.test", ca=pki.client_ca)
    current = pki.issue("new.client.test", ca=pki.other_ca)
    async with run_gateway(mtls_config(pki, certs, up.address)) as (worker, port):
        before = client_context(pki, cert=retired, check_hostname=False)
        assert await mtls_status(port, before, server_hostname) == 200
        # The client CA is replaced (rotated, or the old one compromised).
        worker.apply(loads(mtls_config(pki, certs, up.address, pki.other_ca), "rotated.yaml"))
        # Certificates of the retired CA no longer get through...
        assert await mtls_status(port, before, server_hostname) in (None, 401)
        # ...and those of the new one do.
        after = client_context(pki, cert=current, check_hostname=False)
        assert await mtls_status(port, after, server_hostname) == 200
    await up.close()


@pytest.mark.parametrize("server_hostname", [API, ADMIN], ids=["default", "sni"])
async def test_reload_enabling_client_certificates(
    pki: Pki, certs: Certs, server_hostname: str
) -> None:
    up = await RawUpstream().start()
    leaf = pki.issue("client.example.test", ca=pki.client_ca)
    tls = {"certificates": certs.settings()}
    async with run_gateway(config(up.address, tls=tls)) as (worker, port):
        worker.apply(loads(mtls_config(pki, certs, up.address), "mtls.yaml"))
        context = client_context(pki, cert=leaf, check_hostname=False)
        assert await mtls_status(port, context, server_hostname) == 200
        assert await mtls_status(port, client_context(pki), server_hostname) == 401
    await up.close()


# ---------------------------------------------------------------------------- redirect


@pytest.mark.parametrize(
    ("host", "target", "location"),
    [
        ("example.test", "/a/b?c=d&e", "https://example.test:{port}/a/b?c=d&e"),
        ("example.test:80", "/", "https://example.test:{port}/"),
        ("[::1]:8080", "/x", "https://[::1]:{port}/x"),
        ("Example.Test", "//double/slash", "https://Example.Test:{port}//double/slash"),
    ],
)
async def test_redirect_listener_answers_308_to_https(
    pki: Pki, certs: Certs, host: str, target: str, location: str
) -> None:
    up = await RawUpstream().start()
    async with run_gateway(config(up.address, tls={"certificates": certs.settings()})) as (
        worker,
        port,
    ):
        sock = listen_socket("127.0.0.1", 0, reuse_port=False)
        await worker.serve_redirect(sock, port)
        client = await Client.connect(sock.getsockname()[1])
        res = await client.request("GET", target, host=host)
        assert res.status == 308
        assert res.header("Location") == location.format(port=port)
        assert res.header("Connection") == "close"
        assert await client.closed()
        await client.close()
    assert up.requests == []
    await up.close()


async def test_redirect_to_port_443_has_no_port() -> None:
    worker = Worker(loads(config("127.0.0.1:9"), "test.yaml"))
    sock = listen_socket("127.0.0.1", 0, reuse_port=False)
    try:
        await worker.serve_redirect(sock, 443)
        client = await Client.connect(sock.getsockname()[1])
        res = await client.request("POST", "/form", body=b"a=1", host="shop.test:80")
        assert res.status == 308
        assert res.header("Location") == "https://shop.test/form"
        await client.close()
    finally:
        await worker.drain(1.0)


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: evil.test/\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a@evil.test\r\n\r\n",
        b"NOT HTTP\r\n\r\n",
    ],
    ids=["no-host", "slash-in-host", "userinfo-in-host", "garbage"],
)
async def test_redirect_listener_refuses_bad_requests(raw: bytes) -> None:
    worker = Worker(loads(config("127.0.0.1:9"), "test.yaml"))
    sock = listen_socket("127.0.0.1", 0, reuse_port=False)
    try:
        await worker.serve_redirect(sock, 8443)
        client = await Client.connect(sock.getsockname()[1])
        await client.send(raw)
        res = await client.read()
        assert res.status == 400
        assert res.header("Location") is None
        assert await client.closed()
        await client.close()
    finally:
        await worker.drain(1.0)


async def test_redirect_listener_closes_a_client_that_never_finishes_its_head() -> None:
    config_text = config("127.0.0.1:9", header_timeout="1s", keepalive_timeout="1s")
    worker = Worker(loads(config_text, "test.yaml"))
    sock = listen_socket("127.0.0.1", 0, reuse_port=False)
    try:
        await worker.serve_redirect(sock, 8443)
        client = await Client.connect(sock.getsockname()[1])
        await client.send(b"GET / HTTP/1.1\r\nHost: slow.test\r\n")
        # Like the HTTPS listener, the plain one must not hold a stalled connection
        # open forever (header_timeout); otherwise idle sockets exhaust the worker.
        assert await client.closed(timeout=4)
        await client.close()
    finally:
        await worker.drain(1.0)


# ---------------------------------------------------------------------------- upstream TLS


class TlsUpstream(RawUpstream):
    """A RawUpstream served over TLS; records the SNI names and client certificates."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(self._record)
        self.context = context
        self.names: list[str | None] = []
        self.peer_certs: list[dict[str, Any] | None] = []
        context.sni_callback = self._sni

    def _sni(self, _: Any, name: str | None, __: ssl.SSLContext) -> None:
        self.names.append(name)

    async def _record(
        self, request: Message, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.peer_certs.append(writer.get_extra_info("peercert"))
        writer.write(response(200, b"tls:" + request.target.encode()))

    async def start(self) -> TlsUpstream:
        RawUpstream.instances.append(self)
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self


def upstream_server_context(leaf: Leaf, client_ca: trustme.CA | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.leaf.configure_cert(context)
    if client_ca is not None:
        client_ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def test_upstream_tls_verified_with_the_configured_ca(pki: Pki) -> None:
    up = await TlsUpstream(upstream_server_context(pki.issue("127.0.0.1"))).start()
    text = config(up.address, upstream_tls={"ca": pki.ca_file(pki.ca)})
    async with run_gateway(text) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", "/secure")
        assert res.status == 200
        assert res.body == b"tls:/secure"
        # The pooled TLS connection is reused.
        assert (await client.request("GET", "/again")).body == b"tls:/again"
        await client.close()
    assert up.connections == 1
    await up.close()


async def test_active_checks_of_a_tls_upstream_use_its_tls(pki: Pki) -> None:
    up = await TlsUpstream(upstream_server_context(pki.issue("127.0.0.1"))).start()
    good = upstream_context(UpstreamTlsSettings(ca=pki.ca_file(pki.ca)), "tls")
    assert await probe_once("127.0.0.1", up.port, "/h", 2.0, context=good) is None
    wrong = upstream_context(UpstreamTlsSettings(ca=pki.ca_file(pki.other_ca)), "tls")
    error = await probe_once("127.0.0.1", up.port, "/h", 2.0, context=wrong)
    assert error is not None
    assert error.startswith("TLS handshake failed"), error

    changes: list[tuple[str, str, bool]] = []
    prober = Prober(lambda u, label, healthy: changes.append((u, label, healthy)))
    health = {
        "active": {"path": "/h", "interval": "100ms", "timeout": "100ms", "unhealthy_threshold": 1}
    }
    text = json.dumps(
        {
            "upstreams": {
                "up": {
                    "endpoints": [up.address],
                    "tls": {"ca": pki.ca_file(pki.ca)},
                    "health": health,
                }
            }
        }
    )
    prober.configure(loads(text))
    try:
        await asyncio.sleep(0.5)
        state = prober.states()[("up", up.address)]
        assert state.checks >= 2
        assert (state.healthy, state.last_error, changes) == (True, None, [])
    finally:
        prober.stop()
    await up.close()


async def test_reload_changing_upstream_tls_drops_connections_made_under_the_old(
    pki: Pki,
) -> None:
    up = await TlsUpstream(upstream_server_context(pki.issue("127.0.0.1"))).start()
    async with run_gateway(config(up.address, upstream_tls={"verify": False})) as (worker, port):
        client = await Client.connect(port)
        assert (await client.request("GET", "/a")).status == 200  # pooled, unverified
        # Now verified against a CA that did not sign the upstream's certificate.
        strict = config(up.address, upstream_tls={"ca": pki.ca_file(pki.other_ca)})
        worker.apply(loads(strict, "strict.yaml"))
        res = await client.request("GET", "/b")
        assert res.status == 502, res.body
        assert "certificate verify failed" in json.loads(res.body)["detail"]
        await client.close()
    assert [r.target for r in up.requests] == ["/a"]
    await up.close()


async def test_upstream_tls_with_the_system_cas_is_502(pki: Pki) -> None:
    up = await TlsUpstream(upstream_server_context(pki.issue("127.0.0.1"))).start()
    async with run_gateway(config(up.address, upstream_tls={})) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", "/secure")
        assert res.status == 502
        body = json.loads(res.body)
        assert body["error"] == "upstream_connect_failed"
        assert "certificate verify failed" in body["detail"]
        assert up.address in body["detail"]
        await client.close()
    assert up.requests == []
    await up.close()


async def test_upstream_tls_verify_false_accepts_any_certificate(pki: Pki) -> None:
    leaf = pki.issue("elsewhere.test", ca=pki.other_ca)
    up = await TlsUpstream(upstream_server_context(leaf)).start()
    async with run_gateway(config(up.address, upstream_tls={"verify": False})) as (_, port):
        client = await Client.connect(port)
        assert (await client.request("GET", "/x")).body == b"tls:/x"
        await client.close()
    await up.close()


@pytest.mark.parametrize("server_name", [None, "backend.internal"])
async def test_upstream_tls_server_name_override(pki: Pki, server_name: str | None) -> None:
    # The certificate names the service, not the address the gateway dials.
    up = await TlsUpstream(upstream_server_context(pki.issue("backend.internal"))).start()
    settings: dict[str, Any] = {"ca": pki.ca_file(pki.ca)}
    if server_name is not None:
        settings["server_name"] = server_name
    async with run_gateway(config(up.address, upstream_tls=settings)) as (_, port):
        client = await Client.connect(port)
        res = await client.request("GET", "/named")
        await client.close()
    if server_name is None:
        assert res.status == 502
        body = json.loads(res.body)
        assert body["error"] == "upstream_connect_failed"
        assert "certificate verify failed" in body["detail"]
        assert up.requests == []
    else:
        assert res.status == 200
        assert up.names == ["backend.internal"]  # sent as SNI, and verified
    await up.close()


async def test_upstream_tls_presents_a_client_certificate(pki: Pki) -> None:
    context = upstream_server_context(pki.issue("127.0.0.1"), client_ca=pki.client_ca)
    up = await TlsUpstream(context).start()
    mine = pki.issue("gateway.example.test", ca=pki.client_ca)
    settings = {"ca": pki.ca_file(pki.ca), "cert": mine.cert, "key": mine.key}
    async with run_gateway(config(up.address, upstream_tls=settings)) as (_, port):
        client = await Client.connect(port)
        assert (await client.request("GET", "/with-cert")).status == 200
        await client.close()
    (peer,) = up.peer_certs
    assert peer is not None
    assert peer["subjectAltName"] == (("DNS", "gateway.example.test"),)
    await up.close()


async def test_upstream_requiring_a_client_certificate_refuses_one_without(pki: Pki) -> None:
    context = upstream_server_context(pki.issue("127.0.0.1"), client_ca=pki.client_ca)
    up = await TlsUpstream(context).start()
    async with run_gateway(config(up.address, upstream_tls={"ca": pki.ca_file(pki.ca)})) as (
        worker,
        port,
    ):
        client = await Client.connect(port)
        res = await client.request("GET", "/no-cert")
        assert res.status == 502
        await client.close()
        assert not worker.inflight
    assert up.requests == []
    await up.close()


@pytest.mark.parametrize(("written", "version"), [("1.2", "1.2"), ("1.3", "1.3"), ("'1.3'", "1.3")])
def test_min_version_may_be_written_as_a_number(written: str, version: str) -> None:
    text = (
        "gateway:\n  tls:\n    certificates: [{cert: a.pem, key: a.key}]\n"
        f"    min_version: {written}\n"
    )
    tls = loads(text).gateway.tls
    assert tls is not None
    assert tls.min_version == version


def test_min_version_other_numbers_are_refused() -> None:
    text = "gateway:\n  tls:\n    certificates: [{cert: a.pem, key: a.key}]\n    min_version: 1.1\n"
    with pytest.raises(ConfigError) as info:
        loads(text)
    assert info.value.issues[0].path == "gateway.tls.min_version"
