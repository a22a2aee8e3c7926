"""Hub configuration, from arguments or ``LAULIMA_HUB_*`` variables; insecure setups refused.

Two modes. With ``ca_dir`` (the hub's TLS folder, ``CA/hub`` of ``laulima ca init``) the hub serves
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

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from laulima.errors import ConfigurationError
from laulima.pki.layout import CA_KEY_FILE, HubTlsLayout

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

    model_config = SettingsConfigDict(env_prefix="LAULIMA_HUB_", extra="forbid", validate_by_name=True)

    home: Path = Path(".laulima/hub")
    """Database, blobs and the generated admin token live here."""
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8780
    database_url: str | None = None
    """Any SQLAlchemy URL; default ``sqlite:///{home}/hub.db``."""
    admin_token: SecretStr | None = None
    """Bearer token of the operator; default: generated once into ``home/admin.token``."""
    max_upload_bytes: Annotated[int, Field(gt=0)] = 2 * GIB
    """Largest weights upload (a person's blob; a site's update is also capped by its model's size)."""
    person_pending_upload_bytes: Annotated[int, Field(gt=0)] = 8 * GIB
    """Bytes of one person's uploads that no experiment uses yet; an upload past it is refused
    (413) until they submit an experiment with one, or the clean-up removes unused ones."""
    person_pending_uploads: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    """How many such unused uploads one person may have, whatever their size."""
    person_max_running_experiments: Annotated[int, Field(ge=1, le=100_000)] = 20
    """Running experiments per person (by token name); one more is refused with 429."""
    unused_upload_ttl_s: Annotated[float, Field(gt=0, le=366 * 86400, allow_inf_nan=False)] = 24 * 3600.0
    """A person's upload that no experiment uses, and a blob file no row refers to (left by a
    refused upload or a crash), is deleted this long after it was stored."""
    long_poll_max_s: Annotated[float, Field(ge=0, le=3600)] = 30.0
    orchestrator_tick_s: Annotated[float, Field(gt=0)] = 0.5
    lease_s: Annotated[float, Field(ge=1, le=3600, allow_inf_nan=False)] = 15.0
    """With several hub processes on one database: how long one process's claim on an
    experiment's orchestration lasts without renewal (a thread renews it every third of this). When a process
    dies, another takes its experiments over after at most this long (at once when the dead
    process ran on the same machine)."""
    peer_poll_s: Annotated[float, Field(gt=0, le=60, allow_inf_nan=False)] | None = None
    """Several hub processes on one SQLite database (one machine): a waiting long poll re-reads
    the database this often, since another process may have created its task. Unneeded on
    PostgreSQL, where the processes tell each other at once (LISTEN/NOTIFY)."""
    keep_updates: bool = False
    """Keep every site's update blob after its round is checkpointed (for audits; costs
    model size x sites of disk per round). By default only digests and metrics are kept."""
    ca_dir: Path | None = None
    """The hub's TLS folder, ``CA/hub`` as ``laulima ca init --dir CA`` lays it out: ca.pem,
    hub.pem, hub.key, revoked.json. Never the CA folder itself: the CA's private key stays off
    the hub machine. Set: HTTPS with site certificates. Unset: plain HTTP with tokens, loopback only."""
    key_dir: Path | None = None
    """Where the blob encryption keys live (default ``home/keys``); keep it off the blob volume
    and out of blob backups."""
    audit_dir: Path | None = None
    """Where the hub's audit record (``audit.jsonl``, ``audit.head``) lives (default ``home``).
    Point it at another volume to keep the record apart from the data it accounts for (and
    out of its clean-ups); ``laulima hub-audit verify --home`` takes this folder."""
    blob_store_url: str | None = None
    """``s3://bucket`` or ``s3://bucket/prefix``: blobs in an S3-compatible object store
    (:mod:`laulima.hub.s3blobs`, needs ``pip install 'laulima[s3]'``), sealed as on disk, their
    keys still in ``key_dir``. Unset: the folder ``home/blobs``. Credentials come from the AWS
    chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``), never from here."""
    s3_endpoint_url: str | None = None
    """The S3 server (MinIO, Ceph, any S3-compatible one): ``https://host[:port]``, ``http://`` on
    loopback only. Unset: AWS's own endpoint."""
    s3_region: str | None = None
    """The bucket's region (e.g. ``eu-west-1``); unset: the AWS chain's default."""

    @field_validator("blob_store_url")
    @classmethod
    def _blob_store_url(cls, value: str | None) -> str | None:
        from laulima.hub.s3blobs import parse_store_url

        return None if value is None else parse_store_url(value).url

    @field_validator("s3_endpoint_url")
    @classmethod
    def _s3_endpoint_url(cls, value: str | None) -> str | None:
        from laulima.hub.s3blobs import check_endpoint_url

        return check_endpoint_url(value)

    @field_validator("s3_region")
    @classmethod
    def _s3_region(cls, value: str | None) -> str | None:
        from laulima.hub.s3blobs import check_region

        return check_region(value)

    @model_validator(mode="after")
    def _s3_settings_need_a_bucket(self) -> HubSettings:
        if self.blob_store_url is None and (self.s3_endpoint_url or self.s3_region):
            raise ConfigurationError(
                "s3_endpoint_url / s3_region are set but blob_store_url is not, so blobs would stay in the local "
                "folder; set blob_store_url (LAULIMA_HUB_BLOB_STORE_URL=s3://bucket/prefix) or unset them",
                field="blob_store_url",
            )
        return self

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
    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = 1024
    """Open connections in total; lowered at start to fit the process's RLIMIT_NOFILE
    (:mod:`laulima.hub.connections`). One more is closed at once, and logged."""
    max_connections_per_address: Annotated[int, Field(ge=1, le=1_000_000)] = 64
    """Open connections from one client address (an IPv6 /64 counts as one); one more is closed at once."""
    request_header_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    """A connection must send a complete request head (request line and headers) within this
    long of connecting, or of its next request's first byte; idle and slow-drip clients are closed."""
    max_request_header_bytes: Annotated[int, Field(ge=1024, le=16 * MIB)] = 64 * 1024
    """Size limit of a request head; over it the connection is answered 431 and closed."""
    tls_handshake_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    """A TLS handshake not completed within this long is aborted; so is the closing handshake
    (close_notify) after the hub closes a connection, which would otherwise hold it 30 s."""
    requests_per_minute: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)] = 1200.0
    """Refill rate of each caller's request bucket (a site, or a person by token name): polls,
    evaluations, failure reports, API calls. A healthy agent makes a few per task."""
    request_burst: Annotated[int, Field(ge=1, le=100_000)] = 120
    site_max_polls: Annotated[int, Field(ge=1, le=64)] = 2
    """Concurrent long polls one site may hold (its agent needs one)."""
    site_offline_after_s: Annotated[float, Field(gt=0, le=30 * 86400, allow_inf_nan=False)] = 120.0
    """A site not heard from for this long (and not working on a task) is offline: new rounds
    leave it out and say so. Must exceed ``long_poll_max_s``: agents are heard at every poll."""
    mlflow_tracking_uri: str | None = Field(
        default=None, validation_alias=AliasChoices("LAULIMA_MLFLOW_TRACKING_URI"), repr=False
    )
    """Set: the hub also mirrors every experiment's parameters and per-round metrics into this
    MLflow tracking server (``http(s)://``, ``file:``, a database URI: whatever MLflow accepts;
    :mod:`laulima.hub.mlflow`, needs ``pip install 'laulima[mlflow]'``). Read from
    ``LAULIMA_MLFLOW_TRACKING_URI`` (``mlflow_tracking_uri=`` from Python; the prefixed
    ``LAULIMA_HUB_MLFLOW_TRACKING_URI`` is read too, after it), never from MLflow's own
    ``MLFLOW_TRACKING_URI``. Kept out of the settings' repr; logged without its credentials."""

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _mlflow_uri(cls, value: str | None) -> str | None:
        from laulima.hub.mlflow.uri import check_tracking_uri

        return check_tracking_uri(value)

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
            _refuse_ca_private_key(self.ca_dir)
            for path in (self.ca_file, self.tls_cert_file, self.tls_key_file):
                if not path.is_file():
                    raise ConfigurationError(
                        f"ca_dir {self.ca_dir}: {path.name} is missing; give the hub the 'hub' folder that "
                        "`laulima ca init --dir CA` creates (CA/hub)",
                        field="ca_dir",
                        file=str(path),
                    )
        if self.site_offline_after_s <= self.long_poll_max_s:
            raise ConfigurationError(
                f"site_offline_after_s = {self.site_offline_after_s:g} must exceed long_poll_max_s = "
                f"{self.long_poll_max_s:g}: a site waiting in a long poll would be counted offline",
                field="site_offline_after_s",
            )
        self.key_dir = (self.key_dir or self.home / "keys").expanduser().resolve()
        self.audit_dir = (self.audit_dir or self.home).expanduser().resolve()
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.home / 'hub.db'}"
        return self

    @property
    def tls(self) -> bool:
        return self.ca_dir is not None

    @property
    def ca_layout(self) -> HubTlsLayout:
        if self.ca_dir is None:
            raise ConfigurationError("this hub has no TLS folder (--tls-dir); it runs in token mode", field="ca_dir")
        return HubTlsLayout(self.ca_dir)

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
    def scaled_out(self) -> bool:
        """Whether other hub processes may share this hub's database and blobs: always on
        PostgreSQL, and on SQLite when ``peer_poll_s`` says so (several processes, one machine)."""
        from laulima.hub.db import is_postgresql  # the engine's own reading of the URL

        return self.peer_poll_s is not None or is_postgresql(self.database_url or "sqlite://")

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
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
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


def _refuse_ca_private_key(folder: Path) -> None:
    """The hub never needs the CA's private key; a folder holding it is the wrong one."""
    if not (folder / CA_KEY_FILE).exists():
        return
    fix = (
        f"give the hub {folder / 'hub'} instead and keep the CA folder off the hub machine"
        if (folder / "hub" / "hub.pem").exists()
        else f"run `laulima ca renew --hub --dir {folder}` once to create {folder / 'hub'}, give the hub that "
        "folder and keep the CA folder off the hub machine"
    )
    raise ConfigurationError(
        f"ca_dir {folder}: this is the federation CA's folder (it holds {CA_KEY_FILE}, the CA's private key); {fix}",
        field="ca_dir",
        file=str(folder / CA_KEY_FILE),
    )
