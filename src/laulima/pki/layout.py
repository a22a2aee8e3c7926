"""Where a federation CA folder keeps its files: one definition for the CA and the hub.

No cryptography here, so hub settings can name the files without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["CaLayout"]


@dataclass(frozen=True)
class CaLayout:
    """The files of a CA folder made by ``laulima ca init``."""

    dir: Path

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def hub_cert_file(self) -> Path:
        return self.dir / "hub.pem"

    @property
    def hub_key_file(self) -> Path:
        return self.dir / "hub.key"

    @property
    def revoked_file(self) -> Path:
        return self.dir / "revoked.json"

    @property
    def issued_file(self) -> Path:
        return self.dir / "issued.json"

    @property
    def crl_file(self) -> Path:
        return self.dir / "crl.pem"
