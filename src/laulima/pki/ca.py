"""The federation CA: one folder with its key, the certificates it issued and those it revoked.

Layout of the CA folder (``laulima ca init``)::

    ca.pem  ca.key        the authority (EC P-256, 5 years); ca.key is mode 0600
    hub.pem hub.key       the hub's server certificate (serverAuth, 90 days)
    issued.json           every certificate issued: name, kind, serial, validity
    revoked.json          revoked serials; the hub re-reads it when it changes
    crl.pem               the same as an X.509 CRL, for proxies and other tools

A certificate says who it is in one place the hub reads: a URI in its subjectAltName,
``urn:laulima:site:NAME`` for a site, ``urn:laulima:hub`` for the hub. Site certificates
carry extendedKeyUsage clientAuth only, so a site certificate cannot serve as a hub.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from laulima.errors import ConfigurationError
from laulima.pki.layout import CaLayout

__all__ = [
    "CA_DAYS",
    "HUB_DAYS",
    "SITE_DAYS",
    "CertificateAuthority",
    "Identity",
    "IssuedCert",
    "RevocationList",
    "identity_of",
    "write_private",
]

CA_DAYS = 5 * 365
SITE_DAYS = 90
HUB_DAYS = 90
SITE_URI = "urn:laulima:site:"
HUB_URI = "urn:laulima:hub"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def write_private(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    """Write ``data`` atomically to a file that is never readable by others, not even briefly."""
    raw = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Identity:
    """Who a verified certificate belongs to, as the hub sees it."""

    kind: str
    """``site`` or ``hub``."""
    name: str
    serial: int
    not_before: float
    not_after: float


@dataclass(frozen=True)
class IssuedCert:
    """A freshly issued certificate and its private key (PEM)."""

    name: str
    kind: str
    cert_pem: bytes
    key_pem: bytes
    serial: int
    not_after: float


def identity_of(cert: x509.Certificate | bytes) -> Identity | None:
    """The Laulima identity in a certificate (DER bytes accepted); None if it names none."""
    if isinstance(cert, bytes | bytearray):
        cert = x509.load_der_x509_certificate(bytes(cert))
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(SITE_URI) and _NAME.fullmatch(uri[len(SITE_URI) :]):
            kind, name = "site", uri[len(SITE_URI) :]
            break
        if uri == HUB_URI:
            kind, name = "hub", "hub"
            break
    else:
        return None
    return Identity(
        kind=kind,
        name=name,
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
    )


class RevocationList:
    """Revoked serials from ``revoked.json``, re-read when the file changes (no hub restart)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._serials: dict[int, dict[str, object]] = {}

    def _current(self) -> dict[int, dict[str, object]]:
        try:
            st = self.path.stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._serials = _read_revoked(self.path) if stamp is not None else {}
                self._stamp = stamp
            return self._serials

    def is_revoked(self, serial: int) -> bool:
        return serial in self._current()

    def entry(self, serial: int) -> dict[str, object] | None:
        return self._current().get(serial)


def _read_revoked(path: Path) -> dict[int, dict[str, object]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {int(k, 16): dict(v) for k, v in data.get("revoked", {}).items()}
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise ConfigurationError(f"{path}: unreadable revocation list ({exc})", file=str(path)) from exc


class CertificateAuthority:
    """The CA folder. ``init`` creates one, ``load`` opens one; issuing needs ``ca.key``."""

    def __init__(self, directory: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> None:
        self.dir = Path(directory)
        self.cert = cert
        self._key = key

    # -- files ---------------------------------------------------------------------------
    @property
    def files(self) -> CaLayout:
        return CaLayout(self.dir)

    @property
    def ca_file(self) -> Path:
        return self.files.ca_file

    @property
    def hub_dir(self) -> Path:
        """The hub's TLS folder (no CA key in it): copy it to the hub machine."""
        return self.files.hub.dir

    @property
    def hub_cert_file(self) -> Path:
        return self.files.hub.hub_cert_file

    @property
    def hub_key_file(self) -> Path:
        return self.files.hub.hub_key_file

    @property
    def revoked_file(self) -> Path:
        return self.files.revoked_file

    @property
    def issued_file(self) -> Path:
        return self.files.issued_file

    @property
    def ca_pem(self) -> bytes:
        return _cert_pem(self.cert)

    # -- creation ------------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        directory: str | Path,
        *,
        federation: str = "Laulima federation",
        hub_names: Iterable[str] = (),
        days: int = CA_DAYS,
        hub_days: int = HUB_DAYS,
    ) -> CertificateAuthority:
        """Create the CA and the hub's certificate (for ``hub_names`` and loopback)."""
        directory = Path(directory).expanduser().resolve()
        if (directory / "ca.key").exists() or (directory / "ca.pem").exists():
            raise ConfigurationError(
                f"{directory} already holds a CA; a second one would split the federation. Use it, or "
                "remove the folder first if you really mean to start over (every site must re-enroll)",
                file=str(directory),
            )
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, federation[:64]),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{federation[:50]} CA"),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        write_private(directory / "ca.key", _key_pem(key))
        write_private(directory / "ca.pem", _cert_pem(cert), mode=0o644)
        ca = cls(directory, cert, key)
        ca._save_json(ca.issued_file, {"issued": []})
        ca._save_revoked({"revoked": {}})
        ca.issue_hub(hub_names, days=hub_days)
        ca.write_crl()
        return ca

    @classmethod
    def load(cls, directory: str | Path, *, need_key: bool = True) -> CertificateAuthority:
        directory = Path(directory).expanduser().resolve()
        cert_path = directory / "ca.pem"
        if not cert_path.exists():
            raise ConfigurationError(
                f"{directory} holds no federation CA (no ca.pem); create one with `laulima ca init --dir {directory}`",
                file=str(cert_path),
            )
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = None
        key_path = directory / "ca.key"
        if need_key:
            if not key_path.exists():
                raise ConfigurationError(
                    f"{key_path} is missing: issuing and revoking need the CA's private key", file=str(key_path)
                )
            loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise ConfigurationError(f"{key_path}: not an EC private key", file=str(key_path))
            key = loaded
        return cls(directory, cert, key)

    # -- issuing -------------------------------------------------------------------------
    def issue_site(self, name: str, *, days: int = SITE_DAYS, not_before: dt.datetime | None = None) -> IssuedCert:
        """A new key and a clientAuth certificate for site ``name``."""
        if not _NAME.fullmatch(name):
            raise ConfigurationError(
                f"site name {name!r}: use letters, digits, '.', '_' or '-' (at most 64, starting alphanumeric)",
                field="name",
            )
        return self._issue(
            name,
            "site",
            san=[x509.UniformResourceIdentifier(SITE_URI + name)],
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
            days=days,
            not_before=not_before,
        )

    def issue_hub(self, names: Iterable[str] = (), *, days: int = HUB_DAYS) -> IssuedCert:
        """The hub's serverAuth certificate for ``names`` plus loopback; written to hub.pem/hub.key."""
        hosts = list(dict.fromkeys([*names, "localhost", "127.0.0.1", "::1"]))
        san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(HUB_URI)]
        for host in hosts:
            try:
                san.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
            except ValueError:
                san.append(x509.DNSName(host))
        issued = self._issue("hub", "hub", san=san, usage=ExtendedKeyUsageOID.SERVER_AUTH, days=days)
        self._write_hub_dir()
        write_private(self.hub_key_file, issued.key_pem)
        write_private(self.hub_cert_file, issued.cert_pem, mode=0o644)
        return issued

    def _write_hub_dir(self) -> None:
        """``hub/``: the CA certificate and revocation list beside the hub's own files."""
        hub = self.files.hub
        hub.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(hub.ca_file, self.ca_pem, mode=0o644)
        if not hub.revoked_file.exists():
            revoked = self._load_json(self.revoked_file) or {"revoked": {}}
            self._save_json(hub.revoked_file, revoked)

    def hub_names(self) -> list[str]:
        """The host names and addresses in the current hub certificate (for renewal)."""
        current = self.hub_cert_file if self.hub_cert_file.exists() else self.dir / "hub.pem"  # pre-hub/ layout
        cert = x509.load_pem_x509_certificate(current.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(x) for x in san.get_values_for_type(x509.DNSName)]
        names += [str(x) for x in san.get_values_for_type(x509.IPAddress)]
        return [n for n in names if n not in ("localhost", "127.0.0.1", "::1")]

    def _issue(
        self,
        name: str,
        kind: str,
        *,
        san: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        days: int,
        not_before: dt.datetime | None = None,
    ) -> IssuedCert:
        if self._key is None:
            raise ConfigurationError(f"{self.dir}: loaded without its private key; cannot issue", file=str(self.dir))
        key = ec.generate_private_key(ec.SECP256R1())
        start = not_before or (_now() - dt.timedelta(minutes=5))
        end = start + dt.timedelta(days=days)
        end = min(end, self.cert.not_valid_after_utc)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        issued = self._load_json(self.issued_file).setdefault("issued", [])
        issued.append(
            {
                "name": name,
                "kind": kind,
                "serial": format(serial, "x"),
                "not_before": start.timestamp(),
                "not_after": end.timestamp(),
                "issued_at": _now().timestamp(),
            }
        )
        self._save_json(self.issued_file, {"issued": issued})
        return IssuedCert(name, kind, _cert_pem(cert), _key_pem(key), serial, end.timestamp())

    def issued(self, name: str | None = None, kind: str = "site") -> list[dict[str, object]]:
        rows = self._load_json(self.issued_file).get("issued", [])
        return [r for r in rows if r.get("kind") == kind and (name is None or r.get("name") == name)]

    # -- revocation ----------------------------------------------------------------------
    def revoke(self, name: str, *, kind: str = "site", reason: str = "revoked by the operator") -> list[int]:
        """Revoke every certificate issued to ``name``; returns the serials newly revoked."""
        if self._key is None:
            raise ConfigurationError(f"{self.dir}: loaded without its private key; cannot revoke", file=str(self.dir))
        rows = self.issued(name, kind)
        if not rows:
            raise ConfigurationError(
                f"no {kind} certificate was ever issued to {name!r} by the CA in {self.dir}", field="name"
            )
        data = self._load_json(self.revoked_file)
        revoked = data.setdefault("revoked", {})
        new = []
        for row in rows:
            serial = str(row["serial"])
            if serial not in revoked:
                revoked[serial] = {"name": name, "kind": kind, "at": _now().timestamp(), "reason": reason}
                new.append(int(serial, 16))
        self._save_revoked(data)
        self.write_crl()
        return new

    def _save_revoked(self, data: dict[str, object]) -> None:
        """The revocation list, in the CA folder and in the hub's (a running hub re-reads it)."""
        self._save_json(self.revoked_file, data)
        if self.files.hub.dir.is_dir():
            self._save_json(self.files.hub.revoked_file, data)

    def write_crl(self, days: int = 7) -> Path:
        """``crl.pem``: the revoked serials as an X.509 CRL (for tools other than the hub)."""
        assert self._key is not None
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now)
            .next_update(now + dt.timedelta(days=days))
        )
        for serial, entry in _read_revoked(self.revoked_file).items():
            at = dt.datetime.fromtimestamp(float(entry.get("at", now.timestamp())), dt.UTC)  # type: ignore[arg-type]
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(at).build()
            )
        crl = builder.sign(self._key, hashes.SHA256())
        path = self.files.crl_file
        write_private(path, crl.public_bytes(serialization.Encoding.PEM), mode=0o644)
        return path

    # -- helpers -------------------------------------------------------------------------
    def _load_json(self, path: Path) -> dict[str, Any]:
        if not path.exists():
            return {}
        return json.loads(path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]

    def _save_json(self, path: Path, data: dict[str, object]) -> None:
        write_private(path, json.dumps(data, indent=1) + "\n", mode=0o644)
