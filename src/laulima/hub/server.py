"""Runs the hub under uvicorn, with the fastest event loop and HTTP parser that are installed.

With a CA folder the hub serves HTTPS and verifies client certificates
(:mod:`laulima.hub.tls`); without one it serves plain HTTP, on loopback only. Either way
every connection passes the connection limits of :mod:`laulima.hub.connections` first.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import uvicorn

from laulima.hub.app import create_app
from laulima.hub.connections import ConnectionGuard, ConnectionLimits, guarded_protocol, open_file_limit
from laulima.hub.settings import HubSettings

__all__ = ["serve", "uvicorn_config", "uvicorn_options"]

log = logging.getLogger(__name__)


def uvicorn_options() -> dict[str, object]:
    """httptools + uvloop when available: a 76 MB upload should not cost per-chunk Python work."""
    return {
        "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "timeout_graceful_shutdown": 5,
        "timeout_keep_alive": 30,
        "ws": "none",  # no WebSocket endpoints: an upgrade request is an ordinary (refused) request
    }


def uvicorn_config(settings: HubSettings, app: Any, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration of a hub: connection limits always, TLS with client certificates
    when ``settings.tls``.

    uvicorn gets no SSL context: the guarded protocol class (:mod:`laulima.hub.connections`)
    admits each connection first and then does the TLS handshake itself, with a time limit.
    """
    options: dict[str, Any] = {**uvicorn_options(), "log_level": "info", "access_log": False, **overrides}
    implementation = options.get("http")
    if implementation not in ("httptools", "h11"):
        raise ValueError(f"http={implementation!r}: the hub runs on uvicorn's 'httptools' or 'h11' implementation")
    tls_context = None
    if settings.tls:
        from laulima.hub.tls import H11TLSProtocol, protocol_class, server_ssl_context

        tls_context = server_ssl_context(str(settings.tls_cert_file), str(settings.tls_key_file), str(settings.ca_file))
        base = protocol_class() if implementation == "httptools" else H11TLSProtocol
    elif implementation == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base = HttpToolsProtocol
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        base = H11Protocol
    guard = ConnectionGuard(ConnectionLimits.from_settings(settings, open_file_limit()))
    _log_limits(settings, guard)
    options["http"] = guarded_protocol(base, guard, tls_context)
    return uvicorn.Config(app, host=settings.host, port=settings.port, **options)


def _log_limits(settings: HubSettings, guard: ConnectionGuard) -> None:
    effective = guard.limits.max_connections
    if effective < settings.max_connections:
        log.warning(
            "max_connections lowered from %d to %d: the process may open %s files (RLIMIT_NOFILE) and the hub "
            "keeps some for its database and blobs; raise the limit (ulimit -n) for more",
            settings.max_connections,
            effective,
            open_file_limit(),
        )
    log.info("connection limits: %s", guard.describe())


def serve(settings: HubSettings) -> None:
    """Start the hub and block until it is stopped (Ctrl-C or SIGTERM)."""
    settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings.resolve_admin_token()
    app = create_app(settings)
    token_source = "LAULIMA_HUB_ADMIN_TOKEN" if settings.admin_token else str(settings.admin_token_file)
    print(f"Laulima hub on {settings.url}  (API docs: {settings.url}/docs)", flush=True)
    print(f"  dashboard: {settings.url}/ui/  (sign in with an API token)", flush=True)
    if settings.tls:
        print(f"  mutual TLS: sites need a certificate from the CA whose ca.pem is in {settings.ca_dir}", flush=True)
    else:
        print("  plain HTTP with bearer tokens (loopback only; use --ca-dir for remote sites)", flush=True)
    print(f"  home: {settings.home}   operator token: {token_source}", flush=True)
    uvicorn.Server(uvicorn_config(settings, app)).run()
