"""``laulima site ui``: the site dashboard under uvicorn, on a loopback address only.

The dashboard decides what runs on the hospital's data, so it never listens beyond this
machine; an administrator elsewhere reaches it through an SSH tunnel
(``ssh -L 8790:127.0.0.1:8790 site-host``). At its first start (no ``ui-tokens.json`` yet) it
makes a token for the OS user and prints it once, with the address to sign in at.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from pathlib import Path

import uvicorn

from laulima.errors import ConfigurationError
from laulima.site.ui.app import LOOPBACK_HOSTS, create_app
from laulima.site.ui.tokens import DashboardTokens

__all__ = ["DEFAULT_PORT", "check_host", "serve"]

DEFAULT_PORT = 8790
log = logging.getLogger("laulima.site.ui")


def check_host(host: str) -> str:
    """``host`` if it is this machine's IPv4 loopback (``127.0.0.1``, ``localhost``); else why not."""
    if host == "localhost":
        return host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is None or address.version != 4 or not address.is_loopback:
        raise ConfigurationError(
            f"--host {host!r}: the site dashboard listens on this machine's loopback address only (127.0.0.1): "
            "it approves what runs on the hospital's data. From another machine, use an SSH tunnel: "
            "ssh -L 8790:127.0.0.1:8790 THIS-HOST",
            field="host",
        )
    return host


def serve(home: Path, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, say: Callable[[str], None] = print) -> None:
    """Run the dashboard of the site at ``home`` until interrupted (``say`` prints the first token)."""
    check_host(host)
    if not home.is_dir():
        raise ConfigurationError(
            f"--home {home}: no such folder; give the site's home (`laulima site init --home`)", field="home"
        )
    url = f"http://{host}:{port}"
    tokens = DashboardTokens(home)
    first = tokens.first_start()
    if first is not None:
        name, token = first
        say(
            f"dashboard token for {name} (shown once: keep it like a password; it is stored hashed in "
            f"{tokens.path}):\n\n    {token}\n\nsign in at {url}/login — more tokens: "
            "`laulima site ui-token add NAME --home HOME`"
        )
    elif not tokens.tokens():
        say(f"no dashboard tokens in {tokens.path}: nobody can sign in; make one with `laulima site ui-token add NAME`")
    else:
        say(f"site dashboard of {home} at {url}/ (sign in with your dashboard token)")
    app = create_app(home, allowed_hosts=sorted({host, *LOOPBACK_HOSTS}))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,  # uvicorn's messages go through the logging configured above
        log_level="info",
        access_log=False,
        ws="none",
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run()
