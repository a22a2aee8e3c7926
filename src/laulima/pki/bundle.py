"""The enrolment bundle: one file that takes a hospital from nothing to a configured site.

``laulima site enroll NAME`` writes it at the operator's side; the site admin carries it to
the hospital (it holds the site's private key: treat it like a password) and runs
``laulima site init BUNDLE``, which checks it and installs, under the site's home::

    tls/ca.pem        the federation CA (the agent trusts only hubs it signed)
    tls/site.pem      the site's certificate: its identity at the hub
    tls/site.key      the site's private key, mode 0600
    site.toml         name, hub_url and the three paths above

The bundle is JSON with PEM strings, so an admin can read what is inside with any editor.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from laulima.errors import ConfigurationError
from laulima.pki.ca import CertificateAuthority, IssuedCert, identity_of, write_private

__all__ = ["BUNDLE_FORMAT", "Bundle", "enroll_site", "install_bundle", "make_bundle", "read_bundle"]

BUNDLE_FORMAT = "laulima-site-bundle/1"
TLS_DIR = "tls"


@dataclass(frozen=True)
class Bundle:
    site: str
    hub_url: str
    ca_pem: str
    cert_pem: str
    key_pem: str
    not_after: float

    def to_json(self) -> str:
        return json.dumps({"format": BUNDLE_FORMAT, **self.__dict__}, indent=1) + "\n"


def make_bundle(ca: CertificateAuthority, issued: IssuedCert, hub_url: str, dest: Path) -> Bundle:
    """Write the bundle of a freshly issued site certificate to ``dest`` (mode 0600)."""
    if not hub_url.startswith("https://"):
        raise ConfigurationError(
            f"hub URL {hub_url!r}: sites reach the hub over HTTPS; give e.g. https://hub.example.org:8780",
            field="hub_url",
        )
    bundle = Bundle(
        site=issued.name,
        hub_url=hub_url.rstrip("/"),
        ca_pem=ca.ca_pem.decode(),
        cert_pem=issued.cert_pem.decode(),
        key_pem=issued.key_pem.decode(),
        not_after=issued.not_after,
    )
    write_private(Path(dest), bundle.to_json())
    return bundle


def enroll_site(ca_dir: str | Path, name: str, hub_url: str, dest: str | Path | None = None, **issue: Any) -> Path:
    """What ``laulima site enroll NAME`` does: issue the site's key and certificate from the CA
    in ``ca_dir`` and write its bundle (default ``NAME.laulima-site``); returns the bundle path."""
    ca = CertificateAuthority.load(ca_dir)
    issued = ca.issue_site(name, **issue)
    path = Path(dest) if dest is not None else Path(f"{name}.laulima-site")
    make_bundle(ca, issued, hub_url, path)
    return path


def read_bundle(path: str | Path) -> Bundle:
    """Load and check a bundle: well-formed, certificate signed by its CA, key matching, not expired."""
    path = Path(path)
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"{path}: not a readable Laulima site bundle ({exc})", file=str(path)) from exc
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise ConfigurationError(
            f"{path}: not a Laulima site bundle (expected format {BUNDLE_FORMAT!r}); "
            "ask the federation operator for the file written by `laulima site enroll`",
            file=str(path),
        )
    try:
        bundle = Bundle(**{k: data[k] for k in Bundle.__dataclass_fields__})
    except (KeyError, TypeError) as exc:
        raise ConfigurationError(f"{path}: bundle lacks field {exc}", file=str(path)) from exc
    _check(bundle, path)
    return bundle


def _check(bundle: Bundle, path: Path) -> None:
    try:
        ca = x509.load_pem_x509_certificate(bundle.ca_pem.encode())
        cert = x509.load_pem_x509_certificate(bundle.cert_pem.encode())
        key = serialization.load_pem_private_key(bundle.key_pem.encode(), password=None)
    except ValueError as exc:
        raise ConfigurationError(f"{path}: damaged PEM in the bundle ({exc})", file=str(path)) from exc
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception) as exc:
        raise ConfigurationError(
            f"{path}: the site certificate is not signed by the bundle's CA ({exc})", file=str(path)
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ConfigurationError(f"{path}: the private key does not belong to the certificate", file=str(path))
    ident = identity_of(cert)
    if ident is None or ident.kind != "site" or ident.name != bundle.site:
        raise ConfigurationError(f"{path}: the certificate is not the one of site {bundle.site!r}", file=str(path))
    if ident.not_after < time.time():
        raise ConfigurationError(
            f"{path}: the certificate of site {bundle.site!r} has expired; ask the operator for a new bundle "
            f"(`laulima ca renew {bundle.site}`)",
            file=str(path),
        )


def install_bundle(path: str | Path, home: str | Path, **options: Any) -> Path:
    """Install a bundle into the site's ``home``; returns the written ``site.toml``.

    ``options`` are further site settings (``poll_wait_s=5``, ...). Reinstalling a renewed
    bundle replaces certificate and key and keeps the catalog and state.
    """
    from laulima.site.settings import write_site_config

    bundle = read_bundle(path)
    home = Path(home).expanduser().resolve()
    tls = home / TLS_DIR
    home.mkdir(parents=True, exist_ok=True, mode=0o700)  # owner-only: the home holds the key and updates
    tls.mkdir(exist_ok=True, mode=0o700)
    tls.chmod(0o700)
    write_private(tls / "ca.pem", bundle.ca_pem)
    write_private(tls / "site.pem", bundle.cert_pem)
    write_private(tls / "site.key", bundle.key_pem)
    return write_site_config(
        home,
        name=bundle.site,
        hub_url=bundle.hub_url,
        token=None,
        ca_file=tls / "ca.pem",
        cert_file=tls / "site.pem",
        key_file=tls / "site.key",
        **options,
    )
