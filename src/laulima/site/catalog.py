"""The site's dataset catalog: which local folder a task's dataset name refers to.

Tasks name datasets, never paths: the hub cannot make a site read anything its admin did
not register here. Stored as ``home/catalog.json``, rewritten atomically on every change.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from laulima.errors import ConfigurationError, DataError
from laulima.site._fs import private_dir, write_atomic

__all__ = ["CATALOG_FILE", "Catalog"]

CATALOG_FILE = "catalog.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class Catalog:
    """Dataset name → local path, for one site home.

    Every call re-reads the file, so an agent sees datasets registered while it runs.
    """

    def __init__(self, home: str | Path, site: str | None = None) -> None:
        self.home = Path(home)
        self.path = self.home / CATALOG_FILE
        self.site = site or self.home.name

    def add(self, name: str, path: str | Path) -> Path:
        """Register (or re-point) ``name``; returns the absolute path stored."""
        if not _NAME.fullmatch(name):
            raise ConfigurationError(
                f"dataset name {name!r} is not valid: use letters, digits, '.', '_' or '-' "
                "(at most 64 characters, starting with a letter or digit)",
                field="dataset",
            )
        target = Path(path).expanduser().resolve()
        if not target.exists():
            raise DataError(
                f"cannot register dataset {name!r} at site {self.site!r}: {target} does not exist; "
                "check the path (it must be readable by the agent's user)",
                site=self.site,
                dataset=name,
                file=str(target),
            )
        entries = self._read()
        entries[name] = {"path": str(target), "added_at": time.time()}
        self._write(entries)
        return target

    def remove(self, name: str) -> None:
        entries = self._read()
        if name not in entries:
            raise DataError(self._unknown(name), site=self.site, dataset=name)
        del entries[name]
        self._write(entries)

    def get(self, name: str) -> Path:
        """The folder registered as ``name``; ``DataError`` if unknown or gone."""
        entry = self._read().get(name)
        if entry is None:
            raise DataError(self._unknown(name), site=self.site, dataset=name)
        target = Path(entry["path"])
        if not target.exists():
            raise DataError(
                f"dataset {name!r} at site {self.site!r} is registered at {target}, which no longer "
                f"exists; re-register it with `laulima site dataset add {name} PATH`",
                site=self.site,
                dataset=name,
                file=str(target),
            )
        return target

    def list(self) -> dict[str, Path]:
        """Every registered dataset, by name."""
        return {name: Path(e["path"]) for name, e in sorted(self._read().items())}

    def signature(self) -> tuple[int, int, int] | None:
        """Changes whenever the catalog file does (it is replaced on every write); None: no file."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._read()

    def _unknown(self, name: str) -> str:
        return (
            f"dataset {name!r} is not registered at site {self.site!r}; "
            f"register it with `laulima site dataset add {name} PATH`"
        )

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(raw)
            datasets = data["datasets"]
            if not isinstance(datasets, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("path"), str) for e in datasets.values()
            ):
                raise ValueError("'datasets' must map names to {path: ...}")
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigurationError(
                f"{self.path}: the dataset catalog is damaged ({exc}); fix or delete it and "
                "re-register the datasets with `laulima site dataset add`",
                file=str(self.path),
            ) from exc
        return datasets

    def _write(self, entries: dict[str, dict[str, Any]]) -> None:
        private_dir(self.home)
        write_atomic(self.path, json.dumps({"datasets": entries}, indent=2, sort_keys=True) + "\n")
