"""nnU-Net's settings are environment variables it reads at each use (``nnunetv2/paths.py``,
``nnUNet_n_proc_DA``, ...): set them for a block and put back what was there after.

Process-wide, like the variables: do not run two such blocks in two threads at once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

__all__ = ["environment"]


@contextlib.contextmanager
def environment(values: Mapping[str, str | None]) -> Iterator[None]:
    """``values`` set in ``os.environ`` for the block (None: unset), the previous values restored after."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            _set(name, value)
        yield
    finally:
        for name, value in saved.items():
            _set(name, value)


def _set(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
