"""TLS contexts for mutual authentication between members, and between clients and members."""

from __future__ import annotations

import ssl

from ...config import TlsConfig
from ...errors import InvalidConfigError

__all__ = ["client_context", "server_context"]


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """A server context that requires a client certificate signed by ``tls.ca_file``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _load(ctx, tls)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(tls: TlsConfig) -> ssl.SSLContext:
    """A client context that presents this member's certificate and verifies the server's."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    _load(ctx, tls)
    ctx.check_hostname = False  # members are addressed by IP; the CA is the trust anchor
    return ctx


def _load(ctx: ssl.SSLContext, tls: TlsConfig) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
        ctx.load_verify_locations(tls.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidConfigError(f"raft.tls: cannot load the certificates: {exc}") from exc
