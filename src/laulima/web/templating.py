"""Pages from Jinja2 templates: the dashboard's own, then the shared layout in ``web/templates``.

Autoescaping is on for every template, so a site name, a reason or a manifest shown on a
page is text, never markup; the few values that are markup (SVG charts drawn by
:mod:`laulima.web.charts`) are wrapped in :class:`markupsafe.Markup` where they are made.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined, select_autoescape

from laulima import __version__
from laulima.web import ASSETS_VERSION
from laulima.web.security import SECURITY_HEADERS

__all__ = ["STATIC_DIR", "Pages", "content_etag", "format_ago", "format_number", "format_time"]

STATIC_DIR = Path(__file__).parent / "static"
_SHARED_TEMPLATES = Path(__file__).parent / "templates"


def format_time(timestamp: float | None) -> str:
    """A Unix time in UTC to the second, saying so (the server's local zone means nothing to a
    reader elsewhere; the audit trails' commands print UTC too); an em dash when absent."""
    if timestamp is None or not math.isfinite(timestamp):
        return "—"
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_ago(timestamp: float | None, now: float) -> str:
    """How long ago, in the largest unit that fits ("42 s ago", "3 min ago", "never")."""
    if timestamp is None:
        return "never"
    seconds = max(0.0, now - timestamp)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def format_number(value: float | int | None, digits: int = 4) -> str:
    """A metric for a table: ``digits`` significant figures, integers as they are."""
    if value is None:
        return "—"
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return "∞" if value > 0 else ("−∞" if value < 0 else "NaN")
    return f"{value:.{digits}g}"


class Pages:
    """Renders a dashboard's templates with the shared layout and security headers.

    ``base_path`` is where the dashboard is mounted (``/ui`` on the hub, ``""`` on the
    site); templates build every link from it, so one layout serves both.
    """

    def __init__(self, templates_dir: Path, *, base_path: str, product: str) -> None:
        self.base_path = base_path.rstrip("/")
        self.env = Environment(
            loader=ChoiceLoader([FileSystemLoader(templates_dir), FileSystemLoader(_SHARED_TEMPLATES)]),
            autoescape=select_autoescape(default=True, default_for_string=True),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(time=format_time, number=format_number)
        self.env.globals.update(
            base=self.base_path,
            static=f"{self.base_path}/static",
            assets_version=ASSETS_VERSION,
            version=__version__,
            product=product,
        )

    def render(self, name: str, context: Mapping[str, Any]) -> str:
        return self.env.get_template(name).render(**context)

    def page(
        self,
        request: Request,
        name: str,
        context: Mapping[str, Any],
        *,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
    ) -> HTMLResponse:
        """A whole page or a fragment, with the dashboard's security headers."""
        body = self.render(name, {"request": request, **context})
        return HTMLResponse(body, status_code=status_code, headers={**SECURITY_HEADERS, **(headers or {})})

    def fragment(self, request: Request, name: str, context: Mapping[str, Any], *, etag: str | None = None) -> Response:
        """A live region's content, or 304 when it is what the browser already shows (``etag``:
        the region's version when known without drawing it; else the digest of what was drawn)."""
        body = self.render(name, {"request": request, **context})
        etag = etag or content_etag(body)
        headers = {**SECURITY_HEADERS, "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return HTMLResponse(body, headers=headers)


def content_etag(body: str) -> str:
    """The ETag of a region drawn as ``body``: a digest of it, quoted."""
    return '"' + hashlib.sha256(body.encode()).hexdigest()[:32] + '"'
