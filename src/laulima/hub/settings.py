"""Hub configuration, from arguments or ``LAULIMA_HUB_*`` variables; insecure setups refused."""

from __future__ import annotations

import ipaddress
import os
import secrets
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from laulima.errors import ConfigurationError

__all__ = ["HubSettings", "is_loopback"]

GIB = 1024**3


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

    @model_validator(mode="after")
    def _secure_and_complete(self) -> HubSettings:
        if not is_loopback(self.host):
            raise ConfigurationError(
                f"host {self.host!r}: this hub serves plain HTTP with bearer tokens, and plaintext "
                "is refused off loopback; bind to 127.0.0.1, ::1 or localhost (mutual TLS for "
                "remote sites is not available yet)",
                field="host",
            )
        self.home = self.home.expanduser().resolve()
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.home / 'hub.db'}"
        return self

    @property
    def admin_token_file(self) -> Path:
        return self.home / "admin.token"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

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
