"""A site agent's configuration: ``home/site.toml`` (and ``home/token``), overridden by env.

Precedence, highest first: keyword overrides, environment (``LAULIMA_SITE_*``), the file
``home/site.toml`` written by ``laulima site init``, the defaults below.

A site proves who it is in one of two ways. Over HTTPS (the default, and the only way off
loopback) with its certificate: ``cert_file``/``key_file`` from the enrolment bundle, and
``ca_file``, the federation CA the hub's certificate must chain to. On a loopback test hub
in token mode, with a bearer token that never goes into ``site.toml``: it lives in
``home/token`` (mode 0600) or ``LAULIMA_SITE_TOKEN``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import ssl
import tomllib
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from laulima.errors import ConfigurationError
from laulima.private_files import private_dir, tighten, write_atomic

__all__ = ["CONFIG_FILE", "ENV_PREFIX", "TOKEN_FILE", "SiteSettings", "write_site_config"]

ENV_PREFIX = "LAULIMA_SITE_"
CONFIG_FILE = "site.toml"
TOKEN_FILE = "token"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


class SiteSettings(BaseSettings):
    """Everything an agent needs to know before its first request."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    home: Path
    """The site's folder: config, token, catalog, state and per-task work folders."""
    name: Annotated[str, Field(pattern=_NAME)]
    hub_url: str
    token: Annotated[str | None, Field(min_length=1, repr=False)] = None
    """Bearer token (token mode on a loopback hub only); unused when a certificate is set."""
    poll_wait_s: Annotated[float, Field(ge=0, le=300)] = 20.0
    """How long one long poll for the next task may wait at the hub."""
    backoff_max_s: Annotated[float, Field(gt=0)] = 30.0
    """Ceiling of the exponential backoff between retries after network errors."""
    upload_attempts: Annotated[int, Field(ge=1)] = 5
    """Tries per upload or report before the agent moves on and retries it later."""
    task_time_limit_s: Annotated[float, Field(gt=0)] | None = None
    """Site-side cap on one algorithm run, on top of the hub's per-task limit."""
    keep_tasks: Annotated[int, Field(ge=1)] = 200
    """How many recent tasks the restart state (and their work folders) keeps."""
    ca_file: Path | None = None
    """PEM bundle of the federation CA that signed the hub's certificate."""
    cert_file: Path | None = None
    """The site's certificate (PEM), from the enrolment bundle: its identity at the hub."""
    key_file: Path | None = None
    """The site's private key (PEM, mode 0600)."""
    allow_insecure_http: bool = False
    """Permit plain http:// to a hub that is not on loopback (testing only)."""

    @field_validator("hub_url")
    @classmethod
    def _url_shape(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s) URL such as https://hub.example.org")
        return url.rstrip("/")

    @model_validator(mode="after")
    def _https_off_loopback(self) -> SiteSettings:
        host = urlsplit(self.hub_url).hostname or ""
        if urlsplit(self.hub_url).scheme == "http" and not _is_loopback(host) and not self.allow_insecure_http:
            raise ValueError(
                f"hub_url {self.hub_url!r} uses plain http to a host that is not loopback; "
                "use https (or set allow_insecure_http = true for a test network)"
            )
        return self

    @model_validator(mode="after")
    def _credentials(self) -> SiteSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together; set both (from the enrolment bundle) or neither")
        if self.cert_file is not None:
            if urlsplit(self.hub_url).scheme != "https":
                raise ValueError(f"hub_url {self.hub_url!r}: a site with a certificate talks to its hub over https")
            for path in (self.cert_file, self.key_file, self.ca_file):
                if path is not None and not Path(path).is_file():
                    raise ValueError(f"{path} does not exist; reinstall the bundle with `laulima site init BUNDLE`")
        elif self.token is None:
            raise ValueError(
                "missing credentials: install the enrolment bundle with `laulima site init BUNDLE` "
                f"(a certificate), or give a token ({ENV_PREFIX}TOKEN or the file 'token') for a loopback test hub"
            )
        return self

    @property
    def uses_certificate(self) -> bool:
        return self.cert_file is not None

    def ssl_context(self, *, with_certificate: bool = True) -> ssl.SSLContext | None:
        """The agent's TLS context: trusts only the federation CA, presents the site's certificate.

        httpx needs the context itself (``verify=context``): ``verify=path`` together with
        ``cert=`` would silently send no client certificate.
        """
        if self.ca_file is None and self.cert_file is None:
            return None
        context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if with_certificate and self.cert_file is not None and self.key_file is not None:
            _check_private(Path(self.key_file))
            context.load_cert_chain(str(self.cert_file), str(self.key_file))
        return context

    @property
    def work_dir(self) -> Path:
        return self.home / "work"

    @classmethod
    def load(cls, home: str | Path, **overrides: Any) -> SiteSettings:
        """Read ``home/site.toml`` and ``home/token``; environment variables override both."""
        home = Path(home).expanduser().resolve()
        config_path = home / CONFIG_FILE
        data: dict[str, Any] = {}
        if config_path.exists():
            try:
                data = tomllib.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ConfigurationError(
                    f"{config_path}: cannot read site config ({exc})", file=str(config_path)
                ) from exc
            if "token" in data:
                raise ConfigurationError(
                    f"{config_path}: a token does not belong in site.toml (it would leak with the "
                    f"config); move it to {home / TOKEN_FILE} with mode 0600",
                    file=str(config_path),
                    field="token",
                )
        env_keys = {k.upper() for k in os.environ}
        # Environment beats the file: drop file values that an env variable sets.
        merged = {k: v for k, v in data.items() if f"{ENV_PREFIX}{k}".upper() not in env_keys}
        merged["home"] = home
        has_cert = "cert_file" in merged or "cert_file" in overrides or f"{ENV_PREFIX}CERT_FILE" in env_keys
        if f"{ENV_PREFIX}TOKEN" not in env_keys and "token" not in overrides and not has_cert:
            merged["token"] = _read_token(home)
        merged.update(overrides)
        return cls.from_mapping(merged, source=str(config_path))

    @classmethod
    def from_mapping(cls, values: dict[str, Any], *, source: str = "site settings") -> SiteSettings:
        """Validate ``values`` (plus environment); errors name ``source`` and the field."""
        try:
            return cls(**values)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "(top level)"
            reason = err["msg"]
            if err["type"] == "missing":
                reason = f"missing; set it in {source} or as {ENV_PREFIX}{field.upper()}"
            elif err["type"] == "extra_forbidden":
                reason = "unknown setting; check its spelling"
            raise ConfigurationError(f"{source}: '{field}': {reason}", file=source, field=field) from exc


def write_site_config(home: str | Path, name: str, hub_url: str, token: str | None, **options: Any) -> Path:
    """Create ``home`` with ``site.toml`` (and a 0600 ``token`` file); returns the config path.

    ``options`` are further :class:`SiteSettings` fields (``poll_wait_s=5``, ...); they
    are validated before anything is written.
    """
    home = Path(home).expanduser().resolve()
    SiteSettings.from_mapping(
        {"home": home, "name": name, "hub_url": hub_url, "token": token, **options},
        source=f"site config for {home}",
    )
    private_dir(home)
    tighten(home)  # a home made by an older version (0755): nothing in it is for other users
    lines = [f"name = {json.dumps(name)}", f"hub_url = {json.dumps(hub_url.rstrip('/'))}"]
    for key, value in options.items():
        if value is None:
            continue
        if isinstance(value, bool):
            rendered = "true" if value else "false"
        elif isinstance(value, int | float):
            rendered = repr(value)
        else:
            rendered = json.dumps(str(value))
        lines.append(f"{key} = {rendered}")
    if token is None:
        header = "# Written by `laulima site init`. The site's key is in ./tls/site.key (mode 0600).\n"
    else:
        header = "# Written by `laulima site init`. The token is in ./token (mode 0600), not here.\n"
    config_path = home / CONFIG_FILE
    write_atomic(config_path, header + "\n".join(lines) + "\n")
    if token is not None:
        write_atomic(home / TOKEN_FILE, token.strip() + "\n")
    else:
        (home / TOKEN_FILE).unlink(missing_ok=True)
    return config_path


def _read_token(home: Path) -> str:
    path = home / TOKEN_FILE
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise ConfigurationError(
            f"site at {home} has no token: set {ENV_PREFIX}TOKEN or run `laulima site init` (which writes {path})",
            file=str(path),
            field="token",
        ) from exc
    if os.name == "posix" and st.st_mode & 0o077:
        raise ConfigurationError(
            f"{path} is readable by other users (mode {st.st_mode & 0o777:o}); run `chmod 600 {path}`",
            file=str(path),
            field="token",
        )
    token = path.read_text(encoding="utf-8").strip()
    if not token:
        raise ConfigurationError(f"{path} is empty; put the site token issued by the hub in it", file=str(path))
    return token


def _check_private(path: Path) -> None:
    if os.name == "posix" and path.stat().st_mode & 0o077:
        raise ConfigurationError(
            f"{path} is readable by other users (mode {path.stat().st_mode & 0o777:o}); run `chmod 600 {path}`",
            file=str(path),
            field="key_file",
        )


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
