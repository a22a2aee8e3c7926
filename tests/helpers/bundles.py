"""The test algorithms of :mod:`tests.helpers.algorithms` as the bundles a scientist would submit.

Sites run only built-ins and bundles, so end-to-end tests ship their helper algorithms the
way a data scientist ships theirs: packed from a local file (``source`` in a spec), or
uploaded as a bundle and named by digest (``bundle``).
"""

from __future__ import annotations

import functools
import textwrap
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


#: A data scientist's own algorithm, as source they would write in a package of their own (not
#: one of tests/helpers/algorithms.py): adds 1 to every weight per round; with ``params.marker``
#: a folder, each site leaves a file named after itself there, proof that the code ran at it.
COUNTER = '''
"""A scientist's own algorithm: adds 1 to every weight per round."""
import os
import numpy as np
from laulima import Algorithm, Evaluation, Update


class Counter(Algorithm):
    def initial_weights(self, params, seed):
        return {"w": np.zeros(4, dtype=np.float32)}

    def setup(self, ctx):
        self.ctx = ctx
        marker = ctx.params.get("marker")
        if marker:  # proof that this code ran at this site
            with open(os.path.join(marker, ctx.site), "w") as fh:
                fh.write("ran")

    def train(self, weights, config):
        return Update({"w": weights["w"] + 1.0}, n_samples=1, metrics={"round": float(config.round)})

    def evaluate(self, weights):
        return Evaluation(n_samples=1, metrics={"mean_w": float(weights["w"].mean())})
'''


def write_package(root: Path, name: str, source: str = COUNTER) -> Path:
    """A scientist's package ``root/name`` with ``model.py`` holding ``source``."""
    package = root / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""A data scientist\'s algorithm."""\n')
    (package / "model.py").write_text(textwrap.dedent(source))
    return package
