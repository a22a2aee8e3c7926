"""The test algorithms of :mod:`tests.helpers.algorithms` as the bundles a scientist would submit.

Sites run only built-ins and bundles, so end-to-end tests ship their helper algorithms the
way a data scientist ships theirs: packed from a local file (``source`` in a spec), or
uploaded as a bundle and named by digest (``bundle``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from laulima.algorithms.bundle import PackedBundle, pack

HELPERS_FILE = Path(__file__).resolve().with_name("algorithms.py")
"""The module packed: it becomes the bundle's top-level module ``algorithms``."""
MODULE = "algorithms"


@functools.cache
def helper_bundle(cls: str = "SlowCounter") -> PackedBundle:
    """The bundle whose entry point is ``algorithms:<cls>`` (cached: packing is deterministic)."""
    return pack(HELPERS_FILE, f"{MODULE}:{cls}")


def packed_fields(cls: str = "SlowCounter") -> dict[str, Any]:
    """Spec fields naming ``cls`` by local source, as a scientist writes them; the submitting
    client (``laulima experiment submit``, ``LocalFederation.submit``) packs and uploads it."""
    return {"algorithm": f"{MODULE}:{cls}", "source": str(HELPERS_FILE)}
