"""Runs the hub under uvicorn, with the fastest event loop and HTTP parser that are installed.

With a CA folder the hub serves HTTPS and verifies client certificates
(:mod:`laulima.hub.tls`); without one it serves plain HTTP, on loopback only.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import uvicorn

from laulima.hub.app import create_app
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
    }


def uvicorn_config(settings: HubSettings, app: Any, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration of a hub: TLS with client certificates when ``settings.tls``."""
    options: dict[str, Any] = {**uvicorn_options(), "log_level": "info", "access_log": False, **overrides}
    if settings.tls:
        from laulima.hub.tls import protocol_class, server_ssl_context

        def context(config: uvicorn.Config, default: Any) -> Any:
            return server_ssl_context(str(settings.tls_cert_file), str(settings.tls_key_file), str(settings.ca_file))

        options["http"] = protocol_class() if options.get("http") != "h11" else _h11()
        options["ssl_context_factory"] = context
        options["ssl_certfile"] = str(settings.tls_cert_file)
        options["ssl_keyfile"] = str(settings.tls_key_file)
    return uvicorn.Config(app, host=settings.host, port=settings.port, **options)


def _h11() -> type:
    from laulima.hub.tls import H11TLSProtocol

    return H11TLSProtocol


def serve(settings: HubSettings) -> None:
    """Start the hub and block until it is stopped (Ctrl-C or SIGTERM)."""
    settings.home.mkdir(parents=True, exist_ok=True)
    settings.resolve_admin_token()
    app = create_app(settings)
    token_source = "LAULIMA_HUB_ADMIN_TOKEN" if settings.admin_token else str(settings.admin_token_file)
    print(f"Laulima hub on {settings.url}  (API docs: {settings.url}/docs)", flush=True)
    if settings.tls:
        print(f"  mutual TLS: sites need a certificate from the CA in {settings.ca_dir}", flush=True)
    else:
        print("  plain HTTP with bearer tokens (loopback only; use --ca-dir for remote sites)", flush=True)
    print(f"  home: {settings.home}   operator token: {token_source}", flush=True)
    uvicorn.Server(uvicorn_config(settings, app)).run()
