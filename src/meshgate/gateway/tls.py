"""TLS: termination on the gateway's listener, and TLS to upstreams.

The listener keeps one base :class:`ssl.SSLContext` for its whole life; an SNI
callback switches each handshake to the context of the certificate for the name the
client asked for. Reloading the configuration reloads the certificates: the
callback reads the current set, and the base context's default certificate is
loaded again in place, so that no connection is dropped and no listener restarts.

TLS 1.2 is the floor (1.3 when configured), with forward-secret AEAD ciphers only,
and ALPN offers http/1.1.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from meshgate.config.model import CertificateSettings, TlsSettings, UpstreamTlsSettings
from meshgate.errors import ConfigError, ConfigIssue

__all__ = ["TlsTerminator", "admin_context", "upstream_context"]

# TLS 1.2 suites with forward secrecy and AEAD; TLS 1.3 suites are all such already.
_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _fail(path: str, message: str) -> ConfigError:
    return ConfigError([ConfigIssue(path, message)])


def _server_context(settings: TlsSettings, cert: CertificateSettings, index: int) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[settings.min_version]
    context.set_ciphers(_CIPHERS)
    context.set_alpn_protocols(["http/1.1"])
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_chain(context, cert, f"gateway.tls.certificates[{index}]")
    if settings.client_ca is not None:
        try:
            context.load_verify_locations(cafile=settings.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise _fail(
                "gateway.tls.client_ca", f"cannot load {settings.client_ca!r}: {exc}"
            ) from None
        # Asked for, not required: routes with mtls: true refuse requests without one.
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _load_chain(context: ssl.SSLContext, cert: CertificateSettings, path: str) -> None:
    for name, file in (("cert", cert.cert), ("key", cert.key)):
        if not Path(file).is_file():
            raise _fail(f"{path}.{name}", f"no such file {file!r}; check the path")
    try:
        context.load_cert_chain(cert.cert, cert.key)
    except (OSError, ssl.SSLError) as exc:
        raise _fail(
            path, f"cannot load the certificate and key ({exc}); are they a matching PEM pair?"
        ) from None


class TlsTerminator:
    """The listener's TLS: a base context plus per-name contexts chosen by SNI."""

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        # The listener's base context: its certificate is the fallback until the
        # SNI callback has run, which switches every handshake to a context of
        # the current configuration (so reloads reach the base settings too).
        self.context = _server_context(settings, settings.certificates[0], 0)
        self._default, self._by_name, self._wildcards = self._maps(settings)
        self.context.sni_callback = self._choose

    def _maps(
        self, settings: TlsSettings
    ) -> tuple[ssl.SSLContext, dict[str, ssl.SSLContext], list[tuple[str, ssl.SSLContext]]]:
        """The default context, and the contexts by exact name and by wildcard
        suffix (longest first)."""
        by_name: dict[str, ssl.SSLContext] = {}
        wildcards: list[tuple[str, ssl.SSLContext]] = []
        default = _server_context(settings, settings.certificates[0], 0)
        for index, cert in enumerate(settings.certificates):
            context = default if index == 0 else _server_context(settings, cert, index)
            for pattern in cert.hosts:
                host = pattern.lower().rstrip(".")
                if host.startswith("*."):
                    wildcards.append((host[1:], context))
                else:
                    by_name.setdefault(host, context)
        wildcards.sort(key=lambda item: -len(item[0]))
        return default, by_name, wildcards

    def update(self, settings: TlsSettings) -> None:
        """Use ``settings`` (certificates changed on reload) for new handshakes.

        The files are read again even when the settings did not change, so that
        certificates renewed in place (same paths) are picked up by a reload.
        Everything is loaded before anything changes: a bad file raises
        :class:`ConfigError` and the old certificates keep serving.
        """
        maps = self._maps(settings)  # loads (and so validates) every file first
        _load_chain(self.context, settings.certificates[0], "gateway.tls.certificates[0]")
        self.context.minimum_version = _VERSIONS[settings.min_version]
        # OpenSSL keeps the verify mode of the context a handshake started on.
        self.context.verify_mode = ssl.CERT_OPTIONAL if settings.client_ca else ssl.CERT_NONE
        self.settings = settings
        self._default, self._by_name, self._wildcards = maps

    def _choose(
        self, connection: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: ssl.SSLContext
    ) -> None:
        context = None
        if name:
            name = name.lower().rstrip(".")
            context = self._by_name.get(name)
            if context is None:
                for suffix, candidate in self._wildcards:
                    if name.endswith(suffix) and len(name) > len(suffix):
                        context = candidate
                        break
        # Without a match (or without SNI) the first certificate's current context.
        context = context or self._default
        if context is not connection.context:
            connection.context = context


def admin_context(cert: CertificateSettings) -> ssl.SSLContext:
    """The admin listener's server context (same floor and ciphers as the gateway's)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION
    _load_chain(context, cert, "gateway.admin.tls")
    return context


def upstream_context(settings: UpstreamTlsSettings, path: str) -> ssl.SSLContext:
    """A client context for connecting to an upstream's endpoints."""
    try:
        context = ssl.create_default_context(cafile=settings.ca)
    except (OSError, ssl.SSLError) as exc:
        raise _fail(f"{path}.ca", f"cannot load {settings.ca!r}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if settings.cert is not None and settings.key is not None:
        try:
            context.load_cert_chain(settings.cert, settings.key)
        except (OSError, ssl.SSLError) as exc:
            raise _fail(f"{path}.cert", f"cannot load the client certificate: {exc}") from None
    return context
