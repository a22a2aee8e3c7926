"""The federation server: REST API, database, blob store and the orchestrator that runs rounds.

Import the parts from their modules (``laulima.hub.settings``, ``laulima.hub.app``,
``laulima.hub.server``); this package stays light so importing settings does not load FastAPI.
"""

from __future__ import annotations

__all__: list[str] = []
