"""Mutual TLS for the hub: the server's SSL context, and the verified peer certificate in the app.

The SSL context below verifies client certificates (the handshake itself is run by the
connection guard, :mod:`laulima.hub.connections`, once it has admitted the connection), but
uvicorn does not put the peer's certificate into the ASGI scope. The two protocol classes here — thin subclasses of
uvicorn's httptools and h11 implementations — read it from the TLS connection once, when
the connection is made, and attach it to every request's scope as the ASGI TLS extension
(``scope["extensions"]["tls"]["client_cert_chain"]``, PEM). Nothing in the app touches the
transport, so middleware that wraps ``receive`` cannot break it.

The context asks for a certificate (``CERT_OPTIONAL``) and verifies any that is presented
against the federation CA, expiry included: a certificate from another CA or an expired one
ends the handshake. With TLS 1.3 that client sees a completed handshake and then a closed
connection, and uvicorn would log nothing, so :class:`_LoggingSSLObject` logs each refusal
with OpenSSL's reason. Revocation is checked by the app on every request
(:mod:`laulima.hub.api.deps`), so ``laulima ca revoke`` takes effect without a restart.
"""

from __future__ import annotations

import importlib.util
import logging
import ssl
from collections.abc import Callable, Mapping
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["TLS_EXTENSION", "peer_cert_der", "protocol_class", "server_ssl_context"]

log = logging.getLogger("laulima.hub.tls")

TLS_EXTENSION = "tls"
_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


class _LoggingSSLObject(ssl.SSLObject):
    """Logs a handshake the hub refuses: the client would otherwise only see a disconnect."""

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLCertVerificationError as exc:
            log.warning(
                "TLS handshake refused: the client's certificate failed verification (%s); "
                "it is not signed by this federation's CA, or it has expired",
                exc.verify_message or exc.reason,
            )
            raise
        except ssl.SSLError as exc:
            log.warning("TLS handshake refused: %s", exc.reason or exc)
            raise


def server_ssl_context(cert_file: str, key_file: str, ca_file: str) -> ssl.SSLContext:
    """TLS 1.2+, the hub's certificate, client certificates verified against the federation CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    context.load_verify_locations(cafile=ca_file)
    context.verify_mode = ssl.CERT_OPTIONAL
    context.sslobject_class = _LoggingSSLObject
    return context


class _PeerCertMixin:
    """Adds the ASGI TLS extension to every scope the protocol creates on this connection.

    Both uvicorn implementations build a fresh ``self.scope`` dict per request; a property
    setter lets this class amend it without copying uvicorn's request-parsing code.
    """

    _tls: dict[str, Any] | None = None

    def connection_made(self, transport: Any) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            der = ssl_object.getpeercert(binary_form=True)
            cipher = ssl_object.cipher()
            self._tls = {
                "server_cert": None,
                "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
                "client_cert_name": None,
                "client_cert_error": None,
                "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
                "cipher_suite": None,
                "laulima_cipher": cipher[0] if cipher else None,
            }
        super().connection_made(transport)  # type: ignore[misc]

    @property
    def scope(self) -> Any:
        return self.__dict__.get("_scope")

    @scope.setter
    def scope(self, value: Any) -> None:
        if value is not None and self._tls is not None:
            value.setdefault("extensions", {})[TLS_EXTENSION] = self._tls
        self.__dict__["_scope"] = value


class H11TLSProtocol(_PeerCertMixin, H11Protocol):
    """uvicorn's h11 protocol, with the peer certificate in the scope."""


def protocol_class() -> type:
    """httptools (faster) when installed, else h11; both with the peer certificate."""
    if importlib.util.find_spec("httptools"):
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return type("HttpToolsTLSProtocol", (_PeerCertMixin, HttpToolsProtocol), {"__module__": __name__})
    return H11TLSProtocol


def peer_cert_der(scope: Mapping[str, Any]) -> bytes | None:
    """The verified client certificate of this request (DER), or None if none was presented."""
    tls = scope.get("extensions", {}).get(TLS_EXTENSION)
    if not tls:
        return None
    chain = tls.get("client_cert_chain") or []
    return ssl.PEM_cert_to_DER_cert(chain[0]) if chain else None


ContextFactory = Callable[[Any, Callable[[], ssl.SSLContext]], ssl.SSLContext]
