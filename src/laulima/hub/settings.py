"""Hub configuration, from arguments or ``LAULIMA_HUB_*`` variables; insecure setups refused.

Two modes. With ``ca_dir`` (the federation CA folder of ``laulima ca init``) the hub serves
HTTPS, identifies sites by their client certificates and people by role tokens: the mode
for any real deployment. Without it the hub serves plain HTTP with bearer tokens for sites
too, and only on loopback (tests, quick local runs).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from laulima.errors import ConfigurationError
from laulima.pki.layout import CaLayout

__all__ = ["HubSettings", "is_loopback"]

GIB = 1024**3
MIB = 1024**2


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class HubSettings(BaseSettings):
    """Everything a hub needs to start; one instance per process."""

    model_config = SettingsConfigDict(env_prefix="LAULIMA_HUB_", extra="forbid")

    home: Path = Path(".laulima/hub")
    """Database, blobs and the generated admin token live here."""
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8780
    database_url: str | None = None
    """Any SQLAlchemy URL; default ``sqlite:///{home}/hub.db``."""
    admin_token: SecretStr | None = None
    """Bearer token of the operator; default: generated once into ``home/admin.token``."""
    max_upload_bytes: Annotated[int, Field(gt=0)] = 4 * GIB
    long_poll_max_s: Annotated[float, Field(ge=0)] = 30.0
    orchestrator_tick_s: Annotated[float, Field(gt=0)] = 0.5
    keep_updates: bool = False
    """Keep every site's update blob after its round is checkpointed (for audits; costs
    model size x sites of disk per round). By default only digests and metrics are kept."""
    ca_dir: Path | None = None
    """The federation CA folder (``laulima ca init``): ca.pem, hub.pem, hub.key, revoked.json.
    Set: HTTPS with site certificates. Unset: plain HTTP with tokens, loopback only."""
    key_dir: Path | None = None
    """Where the blob encryption keys live (default ``home/keys``); keep it off the blob volume
    and out of blob backups."""
    max_json_bytes: Annotated[int, Field(gt=0)] = 1 * MIB
    """Body limit of every endpoint except the two weight uploads (which have their own)."""
    body_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    """A request body that sends nothing for this long is aborted with 408."""
    site_uploads_per_minute: Annotated[float, Field(gt=0)] = 120.0
    """Refill rate of each site's upload token bucket (429 when empty)."""
    site_upload_burst: Annotated[int, Field(ge=1)] = 20
    site_max_transfers: Annotated[int, Field(ge=1)] = 2
    """Concurrent uploads plus downloads one site may run; more are answered 429, so one site's
    flood cannot take the hub's threads and bandwidth from the others."""

    @model_validator(mode="after")
    def _secure_and_complete(self) -> HubSettings:
        if self.ca_dir is None and not is_loopback(self.host):
            raise ConfigurationError(
                f"host {self.host!r}: without a CA this hub serves plain HTTP with bearer tokens, and "
                "plaintext is refused off loopback; bind to 127.0.0.1, ::1 or localhost, or serve "
                "HTTPS with client certificates: `laulima ca init` once, then `laulima hub --ca-dir DIR`",
                field="host",
            )
        self.home = self.home.expanduser().resolve()
        if self.ca_dir is not None:
            self.ca_dir = self.ca_dir.expanduser().resolve()
            for path in (self.ca_file, self.tls_cert_file, self.tls_key_file):
                if not path.is_file():
                    raise ConfigurationError(
                        f"ca_dir {self.ca_dir}: {path.name} is missing; create the CA with "
                        f"`laulima ca init --dir {self.ca_dir}`",
                        field="ca_dir",
                        file=str(path),
                    )
        self.key_dir = (self.key_dir or self.home / "keys").expanduser().resolve()
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.home / 'hub.db'}"
        return self

    @property
    def tls(self) -> bool:
        return self.ca_dir is not None

    @property
    def ca_layout(self) -> CaLayout:
        if self.ca_dir is None:
            raise ConfigurationError("this hub has no CA folder (--ca-dir); it runs in token mode", field="ca_dir")
        return CaLayout(self.ca_dir)

    @property
    def ca_file(self) -> Path:
        return self.ca_layout.ca_file

    @property
    def tls_cert_file(self) -> Path:
        return self.ca_layout.hub_cert_file

    @property
    def tls_key_file(self) -> Path:
        return self.ca_layout.hub_key_file

    @property
    def revoked_file(self) -> Path:
        return self.ca_layout.revoked_file

    @property
    def admin_token_file(self) -> Path:
        return self.home / "admin.token"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def resolve_admin_token(self) -> str:
        """The configured token, else the one stored under ``home`` (created on first use)."""
        if self.admin_token is not None:
            token = self.admin_token.get_secret_value()
            if len(token) < 16:
                raise ConfigurationError(
                    "admin_token is shorter than 16 characters; use a long random value, "
                    "or leave it unset so the hub generates one",
                    field="admin_token",
                )
            return token
        path = self.admin_token_file
        if path.exists():
            token = path.read_text(encoding="utf-8").strip()
            if token:
                return token
        self.home.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        tmp = path.with_name(f".admin.token.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        return token
