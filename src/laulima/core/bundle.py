"""Algorithm bundles as data: the format, its limits and its checks, with no disk and no import.

A bundle is an uncompressed tar of ``manifest.json`` and the algorithm's ``*.py`` files under
``src/``, named by the sha256 of its bytes (see :mod:`laulima.algorithms.bundle`, which packs,
unpacks and loads them). This module holds the parts both sides need and that touch nothing
but bytes in memory: the hub checks an uploaded bundle before an experiment may name it, and
never imports training code; a site checks the same way before it unpacks anything.

:func:`verify_bytes` treats the bytes as hostile input: the digest first, then every tar entry
(no links, devices, absolute paths, ``..``, duplicates, unlisted entries; bounded size and
count), then every file's sha256 against the strictly parsed manifest. Failures are
``DataError`` (the hub answers 422) naming the first problem with bundle-relative paths only.

Built-in algorithms (``laulima.algorithms.*``) are not packed: they have a well-known digest
(:func:`builtin_digest`), and :func:`is_builtin_name` says by syntax alone whether a name is
one — so ``os:system`` is refused before anything anywhere imports it.
"""

from __future__ import annotations

import hashlib
import io
import json
import keyword
import re
import sys
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from packaging.requirements import InvalidRequirement, Requirement

from laulima.errors import ConfigurationError, DataError, LaulimaError

__all__ = [
    "BUILTIN_FORMAT",
    "BUILTIN_PACKAGES",
    "BUILTIN_PREFIX",
    "BUNDLE_FORMAT",
    "MANIFEST_NAME",
    "MAX_ARCHIVE_BYTES",
    "MAX_BUNDLE_FILES",
    "MAX_CONTENT_BYTES",
    "MAX_MANIFEST_BYTES",
    "MAX_PATH_CHARS",
    "MAX_PATH_DEPTH",
    "MAX_REQUIREMENTS",
    "MAX_REQUIREMENT_CHARS",
    "SIGNATURE_CONTEXT",
    "SOURCE_DIR",
    "Manifest",
    "builtin_digest",
    "is_builtin_name",
    "read_sources_bytes",
    "verify_bytes",
    "verify_signature",
]

BUNDLE_FORMAT = "laulima-bundle/1"
BUILTIN_FORMAT = "laulima-builtin/1"
BUILTIN_PREFIX = "laulima.algorithms."
BUILTIN_PACKAGES = ("laulima.algorithms", "laulima.nnunet")
"""Where the algorithms shipped with Laulima live: ``laulima.algorithms.*``, and
``laulima.nnunet`` (federated nnU-Net, whose package also runs where experiments are planned)."""
SIGNATURE_CONTEXT = b"laulima-bundle-signature/1\n"
"""Prefixed to the digest before signing, so a bundle signature means nothing anywhere else."""

MANIFEST_NAME = "manifest.json"
SOURCE_DIR = "src"

MAX_BUNDLE_FILES = 2000
MAX_CONTENT_BYTES = 10 * 1024 * 1024
"""Sum of all file sizes in a bundle, manifest included."""
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_ARCHIVE_BYTES = MAX_CONTENT_BYTES + (MAX_BUNDLE_FILES + 1) * 4 * 512 + 20 * 512
"""Content plus tar overhead (header, long-name header, padding per entry; end-of-archive)."""
MAX_REQUIREMENTS = 64
MAX_REQUIREMENT_CHARS = 200
MAX_PATH_CHARS = 240
MAX_PATH_DEPTH = 16

_DIGEST = re.compile(r"[0-9a-f]{64}")
_SIGNATURE = re.compile(r"[0-9a-f]{128}")
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_ENTRY_POINT = re.compile(rf"(?P<module>{_IDENTIFIER}(?:\.{_IDENTIFIER})*):(?P<attr>{_IDENTIFIER})")
_BUILTIN_NAME = re.compile(
    r"^laulima\.(algorithms(\.[A-Za-z_]\w*)+|nnunet(\.[A-Za-z_]\w*)*):[A-Za-z_]\w*$", re.ASCII
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+!-]{0,63}")
_PATH_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
_MANIFEST_KEYS = frozenset({"format", "name", "version", "entry_point", "requirements", "files"})


class _Invalid(ValueError):
    """A rule broken by a manifest field; the caller decides which LaulimaError it becomes."""


# ---------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Manifest:
    """What a bundle declares: its entry point, its requirements and the sha256 of every file.

    ``files`` maps paths relative to the bundle's ``src/`` (``pkg/model.py``) to sha256 hex."""

    name: str
    version: str
    entry_point: str
    requirements: tuple[str, ...]
    files: Mapping[str, str]
    format: str = BUNDLE_FORMAT

    @property
    def top_level(self) -> str:
        """The one importable top-level name the bundle provides (its package or module)."""
        return _top_level_of(self.files)

    @property
    def entry_module(self) -> str:
        return self.entry_point.partition(":")[0]

    @property
    def entry_attr(self) -> str:
        return self.entry_point.partition(":")[2]

    def to_json(self) -> str:
        """The canonical text stored in the bundle (sorted keys, ASCII, one trailing newline)."""
        body = {
            "format": self.format,
            "name": self.name,
            "version": self.version,
            "entry_point": self.entry_point,
            "requirements": list(self.requirements),
            "files": dict(sorted(self.files.items())),
        }
        return json.dumps(body, sort_keys=True, indent=1, ensure_ascii=True) + "\n"


def _checked_manifest(raw: Mapping[str, Any]) -> Manifest:
    """A :class:`Manifest` from raw fields, or :class:`_Invalid` naming the first broken rule."""
    fmt = raw.get("format", BUNDLE_FORMAT)
    if fmt != BUNDLE_FORMAT:
        raise _Invalid(f"format {fmt!r} is not {BUNDLE_FORMAT!r}; this site reads {BUNDLE_FORMAT} bundles only")
    name, version, entry_point = raw.get("name"), raw.get("version"), raw.get("entry_point")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _Invalid(f"name {name!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise _Invalid(f"version {version!r}: use 1-64 letters, digits or '.', '_', '+', '!', '-'")
    module, attr = _split_entry_point(entry_point)
    requirements = raw.get("requirements")
    if not isinstance(requirements, list | tuple) or len(requirements) > MAX_REQUIREMENTS:
        raise _Invalid(f"requirements: expected a list of at most {MAX_REQUIREMENTS} PEP 508 strings")
    for text in requirements:
        _parse_requirement(text)
    files = raw.get("files")
    if not isinstance(files, dict) or not files:
        raise _Invalid("files: expected a non-empty table of path -> sha256")
    if len(files) > MAX_BUNDLE_FILES:
        raise _Invalid(f"files: {len(files)} entries, over the limit of {MAX_BUNDLE_FILES}")
    for path, digest in files.items():
        _check_relative_path(path)
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise _Invalid(f"files: {path}: sha256 must be 64 lowercase hex characters")
    top = _top_level_of(files)
    if top in sys.stdlib_module_names or top == "laulima":
        raise _Invalid(
            f"the bundle's top-level name {top!r} is taken by Python's standard library or Laulima; rename the package"
        )
    if module.split(".")[0] != top or _module_file_in(module, files) is None:
        raise _Invalid(
            f"entry point {entry_point!r}: module {module!r} is not in the bundle, which holds the top-level "
            f"{'package' if top + '/__init__.py' in files else 'module'} {top!r}; name a module inside it "
            f"(e.g. '{top}:{attr}')"
        )
    return Manifest(
        name=name,
        version=version,
        entry_point=f"{module}:{attr}",
        requirements=tuple(requirements),
        files=MappingProxyType(dict(sorted(files.items()))),
    )


def _split_entry_point(entry_point: object) -> tuple[str, str]:
    if not isinstance(entry_point, str) or len(entry_point) > 200 or not _ENTRY_POINT.fullmatch(entry_point):
        raise _Invalid(f"entry point {entry_point!r}: expected 'package.module:Class' (Python identifiers)")
    module, _, attr = entry_point.partition(":")
    if any(keyword.iskeyword(part) for part in [*module.split("."), attr]):
        raise _Invalid(f"entry point {entry_point!r}: a Python keyword cannot be a module or class name")
    return module, attr


def _parse_requirement(text: object) -> Requirement:
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_REQUIREMENT_CHARS:
        raise _Invalid(f"requirement {text!r}: expected a PEP 508 string of at most {MAX_REQUIREMENT_CHARS} characters")
    try:
        req = Requirement(text)
    except InvalidRequirement as exc:
        raise _Invalid(f"requirement {text!r} is not valid PEP 508 ({exc}); e.g. 'numpy>=1.26,<3'") from None
    if req.url:
        raise _Invalid(f"requirement {text!r} names a URL; a site installs nothing: give a name and version range")
    return req


def _check_relative_path(path: object) -> None:
    if not isinstance(path, str) or not path or len(path) > MAX_PATH_CHARS:
        raise _Invalid(f"file path {path!r}: expected a relative path of at most {MAX_PATH_CHARS} characters")
    parts = path.split("/")
    if len(parts) > MAX_PATH_DEPTH or not all(_PATH_PART.fullmatch(part) for part in parts):
        raise _Invalid(
            f"file path {path!r}: only relative paths of letters, digits, '_', '-' and '.' are allowed "
            "(no absolute paths, '..', hidden names or backslashes)"
        )
    if not parts[-1].endswith(".py"):
        raise _Invalid(f"file path {path!r}: a bundle holds Python source files (*.py) only")


def _top_level_of(files: Mapping[str, object]) -> str:
    tops = {path.split("/")[0] for path in files}
    if len(tops) != 1:
        raise _Invalid(f"files: a bundle holds one package or one module, not {sorted(tops)}")
    (top,) = tops
    if "/" not in next(iter(files)):  # a single module
        if len(files) != 1 or not top.endswith(".py"):
            raise _Invalid(f"files: {top!r} next to other files; a bundle holds one package or one module")
        top = top[: -len(".py")]
    elif f"{top}/__init__.py" not in files:
        raise _Invalid(f"files: package {top!r} has no __init__.py")
    if not top.isidentifier() or keyword.iskeyword(top):
        raise _Invalid(f"files: {top!r} is not an importable Python name")
    return top


def _module_file_in(module: str, files: Mapping[str, object]) -> str | None:
    """The bundle file that defines ``module`` (``a/b.py`` or ``a/b/__init__.py``), if any."""
    base = module.replace(".", "/")
    for candidate in (f"{base}.py", f"{base}/__init__.py"):
        if candidate in files:
            return candidate
    return None


# ---------------------------------------------------------------- verify


def verify_bytes(data: bytes, expected_digest: str) -> Manifest:
    """Check a bundle's bytes against ``expected_digest`` and its structure and file hashes
    against its manifest; return the manifest. Raises ``DataError`` naming the first problem."""
    manifest, _ = _verified_bytes(data, expected_digest)
    return manifest


def read_sources_bytes(data: bytes, expected_digest: str) -> dict[str, str]:
    """The verified bundle's source files (path relative to ``src/`` -> text), for an admin's review."""
    _, files = _verified_bytes(data, expected_digest)
    return {path: content.decode("utf-8", errors="replace") for path, content in files.items()}


def _verified_bytes(data: bytes | bytearray | memoryview, expected_digest: str) -> tuple[Manifest, dict[str, bytes]]:
    _require_digest(expected_digest, "expected bundle digest", DataError)
    data = bytes(data)
    if len(data) > MAX_ARCHIVE_BYTES:
        raise DataError(
            f"algorithm bundle: larger than the limit of {MAX_ARCHIVE_BYTES} bytes; a bundle holds source only"
        )
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_digest:
        raise DataError(
            f"algorithm bundle: sha256 {actual} does not match the expected {expected_digest}: it was changed or "
            "damaged on the way; download it again, or ask for the digest of the bundle you meant",
            digest=expected_digest,
        )
    return _parse_bundle(data, expected_digest)


def _parse_bundle(data: bytes, digest: str) -> tuple[Manifest, dict[str, bytes]]:
    """Read every entry into memory (nothing touches the disk), refusing anything but regular
    files at safe, unique paths within the size and count bounds; then match the manifest."""

    def bad(message: str) -> DataError:
        return DataError(f"algorithm bundle {digest[:12]}: {message}", digest=digest)

    entries: dict[str, bytes] = {}
    total = 0
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    except tarfile.TarError as exc:
        raise bad(f"not an uncompressed tar archive ({exc})") from None
    with tar:
        while True:
            try:
                member = tar.next()
            except tarfile.TarError as exc:
                raise bad(f"damaged tar archive ({exc})") from None
            if member is None:
                break
            name = member.name
            if len(entries) >= MAX_BUNDLE_FILES + 1:
                raise bad(f"more than {MAX_BUNDLE_FILES} files")
            _check_entry_name(name, bad)
            if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                raise bad(f"entry {name!r} is a {_entry_kind(member)}; a bundle holds regular files only")
            if name in entries:
                raise bad(f"entry {name!r} appears twice")
            total += member.size
            if member.size < 0 or total > MAX_CONTENT_BYTES:
                raise bad(f"its files exceed {MAX_CONTENT_BYTES} bytes")
            fh = tar.extractfile(member)
            content = fh.read(member.size) if fh is not None else b""
            if len(content) != member.size:
                raise bad(f"entry {name!r} is truncated")
            entries[name] = content
    manifest_bytes = entries.pop(MANIFEST_NAME, None)
    if manifest_bytes is None:
        raise bad(f"no {MANIFEST_NAME}")
    if len(manifest_bytes) > MAX_MANIFEST_BYTES:
        raise bad(f"{MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = _checked_manifest(_strict_json(manifest_bytes))
    except _Invalid as exc:
        raise bad(f"{MANIFEST_NAME}: {exc}") from None
    files: dict[str, bytes] = {}
    prefix = SOURCE_DIR + "/"
    for name, content in entries.items():
        rel = name[len(prefix) :] if name.startswith(prefix) else None
        if rel is None or rel not in manifest.files:
            raise bad(f"entry {name!r} is not listed in {MANIFEST_NAME}")
        if hashlib.sha256(content).hexdigest() != manifest.files[rel]:
            raise bad(f"{rel}: its sha256 differs from the one in {MANIFEST_NAME} (the file was edited)")
        files[rel] = content
    missing = sorted(set(manifest.files) - set(files))
    if missing:
        raise bad(f"{MANIFEST_NAME} lists {missing[0]!r}, which the bundle does not contain")
    return manifest, files


def _check_entry_name(name: str, bad: Any) -> None:
    if not name or name.startswith("/") or "\\" in name or re.match(r"[A-Za-z]:", name):
        raise bad(f"entry {name!r} has an absolute or non-POSIX path")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise bad(f"entry {name!r} has an unsafe path ('..', '.' or an empty part)")


def _entry_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symbolic link"
    if member.islnk():
        return "hard link"
    if member.isdir():
        return "directory"
    if member.ischr() or member.isblk():
        return "device"
    if member.isfifo():
        return "FIFO"
    return f"entry of type {member.type!r}"


def _strict_json(data: bytes) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            raise _Invalid(f"duplicate key in {sorted(k for k in keys if keys.count(k) > 1)[0]!r}")
        return dict(pairs)

    def no_constants(name: str) -> Any:
        raise _Invalid(f"{name} is not valid JSON")

    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _Invalid(f"not valid UTF-8 JSON ({exc.__class__.__name__})") from None
    if not isinstance(value, dict):
        raise _Invalid("expected a JSON object")
    unknown = sorted(set(value) - _MANIFEST_KEYS)
    if unknown:
        raise _Invalid(f"unknown field {unknown[0]!r}")
    missing = sorted(_MANIFEST_KEYS - set(value))
    if missing:
        raise _Invalid(f"missing field {missing[0]!r}")
    return value


# ---------------------------------------------------------------- built-ins


def is_builtin_name(entry_point: str) -> bool:
    """Whether ``entry_point`` names a built-in by its spelling alone (``laulima.algorithms.x:Y``,
    ``laulima.nnunet:NnUNet``; see :data:`BUILTIN_PACKAGES`).

    Syntax only, nothing looked up or imported: the hub uses it to refuse ``os:system`` in a
    spec without a bundle. Whether the module really exists is for the site to find out
    (``laulima.algorithms.bundle.is_builtin`` reads its files)."""
    if not isinstance(entry_point, str) or len(entry_point) > 200 or not _BUILTIN_NAME.fullmatch(entry_point):
        return False
    module, _, attr = entry_point.partition(":")
    return not any(keyword.iskeyword(part) for part in [*module.split("."), attr])


def builtin_digest(entry_point: str) -> str:
    """The well-known digest of a built-in entry point: sha256 of ``"laulima-builtin/1\\n<entry_point>\\n"``."""
    try:
        _split_entry_point(entry_point)
    except _Invalid as exc:
        raise ConfigurationError(f"algorithm: {exc}", field="algorithm") from None
    if not is_builtin_name(entry_point):
        raise ConfigurationError(
            f"algorithm {entry_point!r} is not a built-in; built-ins are under {' or '.join(BUILTIN_PACKAGES)}",
            field="algorithm",
        )
    return hashlib.sha256(f"{BUILTIN_FORMAT}\n{entry_point}\n".encode()).hexdigest()


# ---------------------------------------------------------------- signatures


def verify_signature(digest: str, signature: str, public_key: str | bytes) -> bool:
    """Whether ``signature`` (128 hex characters) is ``public_key``'s Ed25519 signature of
    ``digest``. ``public_key``: PEM SubjectPublicKeyInfo (str or bytes) or the raw 32 bytes.
    A malformed signature or digest is a ``DataError``; a malformed key a ``ConfigurationError``."""
    _require_digest(digest, "bundle digest", DataError)
    if not isinstance(signature, str) or not _SIGNATURE.fullmatch(signature):
        raise DataError("bundle signature: expected 128 lowercase hex characters (an Ed25519 signature)")
    key = _public_key(public_key)
    try:
        key.verify(bytes.fromhex(signature), SIGNATURE_CONTEXT + digest.encode("ascii"))
    except InvalidSignature:
        return False
    return True


def _public_key(value: str | bytes) -> Ed25519PublicKey:
    if isinstance(value, bytes) and len(value) == 32:
        try:
            return Ed25519PublicKey.from_public_bytes(value)
        except ValueError:
            raise ConfigurationError("signing public key: not a valid raw Ed25519 key", field="public_key") from None
    try:
        key = serialization.load_pem_public_key(value.encode() if isinstance(value, str) else value)
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigurationError(
            "signing public key: not a PEM public key or raw 32-byte Ed25519 key", field="public_key"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigurationError(f"signing public key: a {type(key).__name__}, not an Ed25519 key", field="public_key")
    return key


def _require_digest(value: object, what: str, error: type[LaulimaError]) -> None:
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise error(f"{what} {value!r}: expected a sha256 as 64 lowercase hex characters", field="digest")
