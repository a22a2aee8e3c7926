"""What the hub's dashboard and the site's dashboard share: the page layout, the stylesheet,
the live-update script, sessions and CSRF, form parsing and SVG charts.

Server-rendered (Jinja2), no build chain: the only script is ``static/live.js``, which
refreshes marked regions of a page by polling; every chart is SVG drawn here, in Python.
Neither dashboard's data lives here: ``laulima.hub.ui`` and ``laulima.site.ui`` bring their own.
"""

from __future__ import annotations

ASSETS_VERSION = "1"
"""Bumped when ``static/`` changes, so browsers fetch the new files (``?v=`` in their URLs)."""
