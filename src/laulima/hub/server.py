"""Runs the hub under uvicorn, with the fastest event loop and HTTP parser that are installed."""

from __future__ import annotations

import importlib.util
import logging

import uvicorn

from laulima.hub.app import create_app
from laulima.hub.settings import HubSettings

__all__ = ["serve", "uvicorn_options"]

log = logging.getLogger(__name__)


def uvicorn_options() -> dict[str, object]:
    """httptools + uvloop when available: a 76 MB upload should not cost per-chunk Python work."""
    return {
        "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "timeout_graceful_shutdown": 5,
        "timeout_keep_alive": 30,
    }


def serve(settings: HubSettings) -> None:
    """Start the hub and block until it is stopped (Ctrl-C or SIGTERM)."""
    settings.home.mkdir(parents=True, exist_ok=True)
    settings.resolve_admin_token()
    app = create_app(settings)
    token_source = "LAULIMA_HUB_ADMIN_TOKEN" if settings.admin_token else str(settings.admin_token_file)
    print(f"Laulima hub on {settings.url}  (API docs: {settings.url}/docs)", flush=True)
    print(f"  home: {settings.home}   operator token: {token_source}", flush=True)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=False,
        **uvicorn_options(),  # type: ignore[arg-type]
    )
    uvicorn.Server(config).run()
