"""Where the federation's TLS files live: the CA's folder, and the hub's folder inside it.

``laulima ca init --dir CA`` makes two folders. ``CA/`` holds the CA's private key and its
records; it stays with the operator (ideally offline) and is never copied to the hub
machine. ``CA/hub/`` holds exactly what the hub needs — the CA certificate to verify sites,
the hub's own certificate and key, and the revocation list — and is what ``laulima hub
--tls-dir`` is given. ``laulima ca revoke`` updates the list in both.

No cryptography here, so hub settings can name the files without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["CA_KEY_FILE", "CaLayout", "HubTlsLayout"]

CA_KEY_FILE = "ca.key"


@dataclass(frozen=True)
class HubTlsLayout:
    """The hub's TLS folder: everything the hub reads, and no CA private key."""

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


@dataclass(frozen=True)
class CaLayout:
    """The files of a CA folder made by ``laulima ca init``."""

    dir: Path

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def ca_key_file(self) -> Path:
        return self.dir / CA_KEY_FILE

    @property
    def hub(self) -> HubTlsLayout:
        """The folder to copy to the hub machine."""
        return HubTlsLayout(self.dir / "hub")

    @property
    def revoked_file(self) -> Path:
        return self.dir / "revoked.json"

    @property
    def issued_file(self) -> Path:
        return self.dir / "issued.json"

    @property
    def crl_file(self) -> Path:
        return self.dir / "crl.pem"
