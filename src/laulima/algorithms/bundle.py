"""Algorithm bundles: a data scientist's Python source, content-addressed, for a hospital to check and run.

A bundle is an uncompressed tar of ``manifest.json`` and the algorithm's ``*.py`` files under
``src/`` (one package or one module), written deterministically: sorted entries, mtime 0,
uid/gid 0, mode 0644, no owner names. Its name is the sha256 of its bytes, so identical sources
give the same digest and one changed byte gives another — which is what lets a site admit an
algorithm by digest (policy), approve exactly what it reviewed, and audit what ran.

Sites never trust the bytes: :func:`verify` checks the digest, then parses the tar as hostile
input (no links, devices, absolute paths, ``..``, duplicates, unlisted entries; bounded size and
count) and every file's sha256 against the manifest. :func:`unpack` extracts into a per-digest
cache, read-only, atomically. :func:`load_entry_point` imports the entry point from that cache
only: a name outside the bundle (``os:system``) is refused before anything is imported.

Built-in algorithms (``laulima.algorithms.*``) are not packed; they have a well-known digest
(:func:`builtin_digest`). A scientist may sign a digest with an Ed25519 key (:func:`sign`) so a
site policy can admit "whatever this person signed".

Manifest (``manifest.json``, JSON, sorted keys)::

    {"entry_point": "pkg.module:Class", "files": {"pkg/__init__.py": "<sha256>", ...},
     "format": "laulima-bundle/1", "name": "pkg", "requirements": ["numpy>=1.26"], "version": "0"}

Error classes: a bad local input to :func:`pack` or :func:`sign` is a ``ConfigurationError``; a
bundle that fails :func:`verify` is a ``DataError`` (the hub answers 422); unmet requirements are
a ``ConfigurationError`` of the site's environment; an entry point outside its bundle is a
``PolicyError``; the bundle's own code failing at import is an ``AlgorithmError``. Messages name
bundle-relative paths only, never a site's folders: they may be sent to the hub.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import io
import keyword
import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import traceback
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from laulima.algorithms.base import Algorithm, algorithm_class

# The format and the checks that need no disk live in core (the hub verifies bundles too and
# must not import training code); they are re-exported here under their old names.
from laulima.core.bundle import (
    BUILTIN_FORMAT,
    BUILTIN_PREFIX,
    BUNDLE_FORMAT,
    MANIFEST_NAME,
    MAX_ARCHIVE_BYTES,
    MAX_BUNDLE_FILES,
    MAX_CONTENT_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_PATH_CHARS,
    MAX_PATH_DEPTH,
    MAX_REQUIREMENT_CHARS,
    MAX_REQUIREMENTS,
    SIGNATURE_CONTEXT,
    SOURCE_DIR,
    Manifest,
    _checked_manifest,
    _Invalid,
    _module_file_in,
    _parse_requirement,
    _require_digest,
    _split_entry_point,
    _verified_bytes,
    builtin_digest,
    is_builtin_name,
    read_sources_bytes,
    verify_bytes,
    verify_signature,
)
from laulima.errors import AlgorithmError, ConfigurationError, DataError, LaulimaError, PolicyError
from laulima.private_files import write_atomic

__all__ = [
    "BUILTIN_FORMAT",
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
    "PackedBundle",
    "SigningKey",
    "SkippedFile",
    "builtin_digest",
    "check_requirements",
    "find_entry_point",
    "generate_signing_key",
    "is_builtin",
    "is_builtin_name",
    "load_entry_point",
    "pack",
    "read_sources",
    "read_sources_bytes",
    "sign",
    "unpack",
    "verify",
    "verify_bytes",
    "verify_signature",
    "visible_text",
]

UNPACKED_MARKER = ".laulima-unpacked"

_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"


# ---------------------------------------------------------------- results of pack


class SkippedFile(NamedTuple):
    """A file in the source that :func:`pack` left out, and why (shown to the data scientist)."""

    path: str
    reason: str


@dataclass(frozen=True)
class PackedBundle:
    """The result of :func:`pack`: the bundle's bytes, their sha256, the manifest, what was left out."""

    data: bytes = field(repr=False)
    digest: str
    manifest: Manifest
    skipped: tuple[SkippedFile, ...] = ()

    def save(self, path: str | Path) -> Path:
        """Write the bundle to ``path`` atomically (a temporary file, then a rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, self.data, fsync=True)
        return path


# ---------------------------------------------------------------- pack


def pack(
    source: Path | str,
    entry_point: str | None = None,
    *,
    name: str | None = None,
    version: str = "0",
    requirements: Sequence[str] = (),
) -> PackedBundle:
    """Bundle the Python sources of ``source``: a package directory, a single ``.py`` file, or an
    importable module name (found without executing it; a dotted name bundles its last part as
    the top level). A string naming an existing path is a path. Only ``*.py`` files are taken;
    other files, hidden entries and ``__pycache__`` are listed in ``skipped``; a symbolic link or
    special file is refused. ``entry_point`` (``pkg.module:Class``) must name a module in the
    bundle and a name that module defines; None finds it: the one class in the bundle that
    derives from ``Algorithm`` (read from the syntax trees, nothing run). ``requirements`` are
    PEP 508 strings with version ranges (``torch>=2.2,<3``); no URLs."""
    root, is_package = _resolve_source(source)
    top = root.stem if not is_package else root.name
    if not top.isidentifier() or keyword.iskeyword(top):
        raise ConfigurationError(
            f"algorithm source: {top!r} is not an importable Python name; rename it "
            "(letters, digits and underscores, not starting with a digit)",
            field="source",
        )
    files, skipped = _collect_sources(root, is_package)
    if entry_point is None:
        entry_point = find_entry_point(files)
    manifest_fields = {
        "name": top if name is None else name,
        "version": version,
        "entry_point": entry_point,
        "requirements": _normalized_requirements(requirements),
        "files": {path: hashlib.sha256(data).hexdigest() for path, data in sorted(files.items())},
    }
    try:
        manifest = _checked_manifest(manifest_fields)
    except _Invalid as exc:
        raise ConfigurationError(f"algorithm bundle: {exc}", field="bundle") from None
    _check_entry_attr_defined(manifest, files)
    manifest_json = manifest.to_json().encode("ascii")
    if len(manifest_json) + sum(len(d) for d in files.values()) > MAX_CONTENT_BYTES:
        raise ConfigurationError(
            f"algorithm bundle: its files and manifest exceed {MAX_CONTENT_BYTES} bytes; bundle only the algorithm's "
            "package",
            field="source",
        )
    data = _tar_bytes(manifest_json, files)
    if len(data) > MAX_ARCHIVE_BYTES:  # pragma: no cover - content bounds keep this out of reach
        raise ConfigurationError(f"algorithm bundle: {len(data)} bytes, over the limit of {MAX_ARCHIVE_BYTES}")
    return PackedBundle(data=data, digest=hashlib.sha256(data).hexdigest(), manifest=manifest, skipped=skipped)


def find_entry_point(files: Mapping[str, bytes]) -> str:
    """``module:Class`` of the one class in ``files`` (bundle-relative ``.py`` paths) whose bases
    name ``Algorithm`` (``Algorithm``, ``laulima.Algorithm``, ...); refused when there is none or
    more than one, naming them, so the scientist says which with ``--entry-point``."""
    found: list[str] = []
    for rel, data in sorted(files.items()):
        try:
            tree = ast.parse(data)
        except (SyntaxError, ValueError):
            continue  # reported where the entry point's module is checked
        parts = rel[: -len(".py")].split("/")
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and _derives_from_algorithm(node):
                found.append(f"{module}:{node.name}")
    if len(found) == 1:
        return found[0]
    if not found:
        raise ConfigurationError(
            "algorithm source: no public class deriving from laulima.Algorithm found; name the entry point "
            "(--entry-point package.module:Class)",
            field="entry_point",
        )
    raise ConfigurationError(
        f"algorithm source: several algorithm classes ({', '.join(found[:10])}); name the one to run "
        "with --entry-point",
        field="entry_point",
    )


def _derives_from_algorithm(node: ast.ClassDef) -> bool:
    for base in node.bases:
        name = base.attr if isinstance(base, ast.Attribute) else base.id if isinstance(base, ast.Name) else ""
        if name == "Algorithm":
            return True
    return False


def _resolve_source(source: Path | str) -> tuple[Path, bool]:
    """The source's real path and whether it is a package directory."""
    if isinstance(source, str) and not _looks_like_path(source):
        return _resolve_module_name(source)
    path = Path(source)
    try:
        path = path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise ConfigurationError(
            f"algorithm source {str(source)!r} does not exist; give a package directory, a .py file "
            "or an importable module name",
            field="source",
        ) from exc
    if path.is_dir():
        if not (path / "__init__.py").is_file():
            raise ConfigurationError(
                f"algorithm source {str(source)!r} is a directory without __init__.py; a bundle holds one "
                "package: add an empty __init__.py, or give the module file itself",
                field="source",
            )
        return path, True
    if path.is_file() and path.suffix == ".py":
        return path, False
    raise ConfigurationError(
        f"algorithm source {str(source)!r} is neither a package directory nor a .py file", field="source"
    )


def _looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or text.endswith(".py") or os.path.exists(text)


def _resolve_module_name(name: str) -> tuple[Path, bool]:
    if not re.fullmatch(rf"{_IDENTIFIER}(?:\.{_IDENTIFIER})*", name):
        raise ConfigurationError(
            f"algorithm source {name!r} is neither an existing path nor a module name", field="source"
        )
    spec = _find_spec_without_import(name.split("."), None)
    if spec is None:
        raise ConfigurationError(
            f"algorithm source: module {name!r} is not found on this Python's path; give its directory or file",
            field="source",
        )
    origin = spec.origin
    if spec.submodule_search_locations is not None and origin and origin.endswith("__init__.py"):
        return Path(origin).resolve().parent, True
    if origin and origin.endswith(".py") and spec.submodule_search_locations is None:
        return Path(origin).resolve(), False
    raise ConfigurationError(
        f"algorithm source: module {name!r} is not Python source in a regular package or file "
        "(built-in, compiled or namespace package); give its directory or file",
        field="source",
    )


def _find_spec_without_import(
    parts: Sequence[str], search: Sequence[str] | None
) -> importlib.machinery.ModuleSpec | None:
    """Find a (sub)module's spec walking the path finder, so no parent package's code runs
    (``importlib.util.find_spec('a.b')`` would import ``a``)."""
    spec = None
    for i, part in enumerate(parts):
        spec = importlib.machinery.PathFinder.find_spec(part, list(search) if search is not None else None)
        if spec is None:
            return None
        if i < len(parts) - 1:
            if spec.submodule_search_locations is None:
                return None
            search = list(spec.submodule_search_locations)
    return spec


def _collect_sources(root: Path, is_package: bool) -> tuple[dict[str, bytes], tuple[SkippedFile, ...]]:
    """The bundle's files, keyed by their path relative to ``src/``, and what was skipped."""
    if not is_package:
        return {root.name: _read_source_file(root, root.name)}, ()
    files: dict[str, bytes] = {}
    skipped: list[SkippedFile] = []
    total = 0
    base = root.parent
    for directory, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(directory)
        kept = []
        for dirname in sorted(dirnames):
            rel = (here / dirname).relative_to(base).as_posix()
            if dirname == "__pycache__":
                skipped.append(SkippedFile(rel + "/", "compiled-bytecode cache"))
            elif dirname.startswith("."):
                skipped.append(SkippedFile(rel + "/", "hidden directory"))
            elif (here / dirname).is_symlink():
                raise ConfigurationError(
                    f"algorithm source: {rel} is a symbolic link; a bundle holds regular files only: "
                    "copy what it points to in place, or move it out of the package",
                    field="source",
                )
            else:
                kept.append(dirname)
        dirnames[:] = kept
        for filename in sorted(filenames):
            path = here / filename
            rel = path.relative_to(base).as_posix()
            if filename.startswith("."):
                skipped.append(SkippedFile(rel, "hidden file"))
                continue
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise ConfigurationError(
                    f"algorithm source: {rel} is a symbolic link; a bundle holds regular files only: "
                    "copy the file in place, or move the link out of the package",
                    field="source",
                )
            if not _inside(path, root):  # pragma: no cover - os.walk without links stays inside
                raise ConfigurationError(f"algorithm source: {rel} escapes the source directory", field="source")
            if not filename.endswith(".py"):
                skipped.append(SkippedFile(rel, "not a Python source file (*.py)"))
                continue
            if not stat.S_ISREG(mode):
                raise ConfigurationError(f"algorithm source: {rel} is not a regular file", field="source")
            if len(files) >= MAX_BUNDLE_FILES:
                raise ConfigurationError(
                    f"algorithm source: more than {MAX_BUNDLE_FILES} Python files; bundle only the algorithm's "
                    "package (data, environments and tests belong elsewhere)",
                    field="source",
                )
            data = _read_source_file(path, rel)
            total += len(data)
            if total > MAX_CONTENT_BYTES:
                raise ConfigurationError(
                    f"algorithm source: its Python files exceed {MAX_CONTENT_BYTES} bytes; bundle only the "
                    "algorithm's package",
                    field="source",
                )
            files[rel] = data
    return files, tuple(skipped)


def _read_source_file(path: Path, rel: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ConfigurationError(f"algorithm source: cannot read {rel} ({exc.strerror})", field="source") from exc
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise ConfigurationError(f"algorithm source: {rel} is not a regular file", field="source")
        data = fh.read(MAX_CONTENT_BYTES + 1)
    if len(data) > MAX_CONTENT_BYTES:
        raise ConfigurationError(
            f"algorithm source: {rel} is larger than {MAX_CONTENT_BYTES} bytes; a bundle holds source code only",
            field="source",
        )
    return data


def _normalized_requirements(requirements: Sequence[str]) -> list[str]:
    if isinstance(requirements, str):
        raise ConfigurationError(
            "algorithm requirements: give a list of PEP 508 strings, not one string", field="requirements"
        )
    out: list[str] = []
    for text in requirements:
        try:
            req = _parse_requirement(text)
        except _Invalid as exc:
            raise ConfigurationError(f"algorithm requirements: {exc}", field="requirements") from None
        out.append(str(req))
    return sorted(set(out), key=lambda r: (canonicalize_name(Requirement(r).name), r))


def _check_entry_attr_defined(manifest: Manifest, files: Mapping[str, bytes]) -> None:
    rel = _module_file_in(manifest.entry_module, manifest.files)
    assert rel is not None  # _checked_manifest made sure
    try:
        tree = ast.parse(files[rel], filename=rel)
    except (SyntaxError, ValueError) as exc:
        line = getattr(exc, "lineno", None)
        raise ConfigurationError(
            f"algorithm bundle: {rel}{f' line {line}' if line else ''} is not valid Python ({exc.__class__.__name__}: "
            f"{getattr(exc, 'msg', exc)}); fix it before packing",
            field="source",
        ) from None
    names = _top_level_names(tree)
    if manifest.entry_attr not in names and "*" not in names:
        raise ConfigurationError(
            f"algorithm bundle: entry point {manifest.entry_point!r}: {rel} defines no {manifest.entry_attr!r} "
            "at its top level; name the algorithm class defined there",
            field="entry_point",
        )


def _top_level_names(tree: ast.Module) -> set[str]:
    """Names a module binds at its top level, read from its syntax tree without running it
    (``*`` when it star-imports, which could bind anything)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Name):
                        names.add(sub.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                names.add(alias.asname or alias.name.partition(".")[0])
        elif isinstance(node, ast.If | ast.Try):
            names |= _top_level_names(ast.Module(body=_branches(node), type_ignores=[]))
    return names


def _branches(node: ast.If | ast.Try) -> list[ast.stmt]:
    body = list(node.body) + list(node.orelse)
    if isinstance(node, ast.Try):
        body += list(node.finalbody) + [stmt for handler in node.handlers for stmt in handler.body]
    return body


def _tar_bytes(manifest_json: bytes, files: Mapping[str, bytes]) -> bytes:
    """The canonical archive: manifest first, then ``src/`` files in sorted order, no metadata."""
    entries = [(MANIFEST_NAME, manifest_json)] + [(f"{SOURCE_DIR}/{rel}", files[rel]) for rel in sorted(files)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# ---------------------------------------------------------------- verify


def verify(data_or_path: bytes | str | Path, expected_digest: str) -> Manifest:
    """Check a bundle's bytes against ``expected_digest`` and its structure and file hashes
    against its manifest; return the manifest. Raises ``DataError`` naming the first problem."""
    manifest, _ = _verified(data_or_path, expected_digest)
    return manifest


def read_sources(data_or_path: bytes | str | Path, expected_digest: str) -> dict[str, str]:
    """The verified bundle's source files (path relative to ``src/`` -> text), for an admin's review."""
    _, files = _verified(data_or_path, expected_digest)
    return {path: data.decode("utf-8", errors="replace") for path, data in files.items()}


def visible_text(text: str) -> tuple[str, int]:
    """``text`` with every control character but newline and tab written out (``\\x1b``, ``\\u202e``),
    and how many there were: a source file shown for review (in a terminal or a browser) reads as
    it runs, with no escape sequence or bidirectional override ("Trojan Source") to hide code."""
    out: list[str] = []
    hidden = 0
    for ch in text:
        if ch.isprintable() or ch in "\n\t":
            out.append(ch)
        else:
            hidden += 1
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
    return "".join(out), hidden


def _verified(data_or_path: bytes | str | Path, expected_digest: str) -> tuple[Manifest, dict[str, bytes]]:
    _require_digest(expected_digest, "expected bundle digest", DataError)  # before any file is read
    return _verified_bytes(_bundle_bytes(data_or_path), expected_digest)


def _bundle_bytes(data_or_path: bytes | str | Path) -> bytes:
    if isinstance(data_or_path, bytes | bytearray | memoryview):
        data = bytes(data_or_path)
    else:
        try:
            with open(data_or_path, "rb") as fh:
                data = fh.read(MAX_ARCHIVE_BYTES + 1)
        except OSError as exc:
            raise DataError(
                f"algorithm bundle: cannot read the bundle file ({exc.strerror or exc})", path=str(data_or_path)
            ) from exc
    if len(data) > MAX_ARCHIVE_BYTES:
        raise DataError(
            f"algorithm bundle: larger than the limit of {MAX_ARCHIVE_BYTES} bytes; a bundle holds source only"
        )
    return data


# ---------------------------------------------------------------- requirements


def check_requirements(manifest: Manifest) -> None:
    """Raise ``ConfigurationError`` naming the first requirement this Python environment does not
    satisfy: a package not installed, or installed at a version outside the declared range.
    Requirements whose environment marker does not apply here are skipped; extras are not checked."""
    for text in manifest.requirements:
        try:
            req = _parse_requirement(text)
        except _Invalid as exc:
            raise ConfigurationError(f"algorithm bundle {manifest.name!r}: {exc}", field="requirements") from None
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            installed = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            raise ConfigurationError(
                f"algorithm {manifest.name!r} requires {text!r}, but package {req.name!r} is not installed "
                "at this site; install it in the site's environment, or ask the data scientist to drop it",
                field="requirements",
                package=req.name,
                requirement=text,
            ) from None
        try:
            ok = req.specifier.contains(Version(installed), prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            raise ConfigurationError(
                f"algorithm {manifest.name!r} requires {text!r}, but {req.name} {installed} is installed at this "
                f"site; install a version in {str(req.specifier)!r}, or ask the data scientist to widen the range",
                field="requirements",
                package=req.name,
                requirement=text,
                installed=installed,
            )


# ---------------------------------------------------------------- unpack


def unpack(data_or_path: bytes | str | Path, digest: str, cache_dir: str | Path) -> Path:
    """Verify the bundle, then extract it into ``cache_dir/<digest>/`` (``manifest.json``,
    ``src/``, a completion marker) with read-only files; return that bundle directory.

    The directory appears whole or not at all (extracted in a temporary folder, then renamed).
    An existing unpack is reused when its marker names the digest and every file still matches
    the manifest; anything else there is replaced. Give the returned directory to
    :func:`load_entry_point` — nothing needs to go on ``sys.path``; ``<dir>/src`` is the import
    root if a child process must import the bundle by name."""
    manifest, files = _verified(data_or_path, digest)
    cache = Path(cache_dir)
    target = cache / digest
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if _is_complete_unpack(target, digest, manifest):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".unpack-{digest[:12]}-", dir=cache))
        try:
            _write_tree(tmp, manifest, files, digest)
            _move_into_place(tmp, target, digest, manifest)
        finally:
            if tmp.exists():
                _remove_tree(tmp)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot write algorithm bundle {digest[:12]} to the site's bundle cache ({exc.strerror or exc}); "
            "check that folder's permissions and free space",
            path=str(cache),
        ) from exc
    return target


def _write_tree(root: Path, manifest: Manifest, files: Mapping[str, bytes], digest: str) -> None:
    _write_new(root / MANIFEST_NAME, manifest.to_json().encode("ascii"))
    for rel, data in files.items():
        path = root / SOURCE_DIR / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_new(path, data)
    _write_new(root / UNPACKED_MARKER, _marker_text(digest))
    for directory, _dirs, _files in os.walk(root, topdown=False):
        os.chmod(directory, 0o500)  # the site user's alone, and read-only


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o400)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _marker_text(digest: str) -> bytes:
    return f"{BUNDLE_FORMAT}\n{digest}\n".encode("ascii")


def _move_into_place(tmp: Path, target: Path, digest: str, manifest: Manifest) -> None:
    try:
        os.rename(tmp, target)
        return
    except OSError:
        if _is_complete_unpack(target, digest, manifest):  # another process finished first
            return
    stale = target.with_name(f".stale-{digest[:12]}-{uuid.uuid4().hex}")
    os.rename(target, stale)
    try:
        os.rename(tmp, target)
    finally:
        _remove_tree(stale)


def _is_complete_unpack(target: Path, digest: str, manifest: Manifest) -> bool:
    """True when ``target`` is a real directory with the marker and exactly the manifest's files."""
    try:
        if not stat.S_ISDIR(target.lstat().st_mode):
            return False
        if _read_regular(target / UNPACKED_MARKER) != _marker_text(digest):
            return False
        if _read_regular(target / MANIFEST_NAME) != manifest.to_json().encode("ascii"):
            return False
        found: set[str] = set()
        src = target / SOURCE_DIR
        for rel, path in _walk_files(src):
            expected = manifest.files.get(rel)
            data = _read_regular(path)
            if expected is None or data is None or hashlib.sha256(data).hexdigest() != expected:
                return False
            found.add(rel)
        return found == set(manifest.files)
    except OSError:
        return False


def _walk_files(src: Path) -> Iterator[tuple[str, Path]]:
    """Every non-directory under ``src`` except bytecode caches, as (relative path, path)."""
    for directory, dirnames, filenames in os.walk(src, followlinks=False):
        links = [d for d in dirnames if (Path(directory) / d).is_symlink()]
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames + links:
            path = Path(directory) / name
            yield path.relative_to(src).as_posix(), path


def _read_regular(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            return None
        return fh.read(MAX_CONTENT_BYTES + 1)


def _remove_tree(path: Path) -> None:
    """Remove an unpacked (read-only) tree, or a link or file left where it stood."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    for directory, _dirs, _files in os.walk(path, followlinks=False):
        os.chmod(directory, 0o700)
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- load


def load_entry_point(bundle_dir: str | Path, entry_point: str) -> type[Algorithm]:
    """Import ``entry_point``'s module from ``bundle_dir/src`` only and return its Algorithm class.

    The module must be a file of this bundle: anything else (``os:system``, an installed
    package) is refused with a ``PolicyError`` before any import. The bundle's top-level package
    is loaded from the bundle by path; its submodules then import normally through it. A
    top-level name already imported in this process from elsewhere is refused too."""
    try:
        module_name, attr = _split_entry_point(entry_point)
    except _Invalid as exc:
        raise ConfigurationError(f"algorithm: {exc}", field="algorithm") from None
    src = Path(bundle_dir) / SOURCE_DIR
    if not src.is_dir():
        raise ConfigurationError(
            "algorithm: the given folder is not an unpacked bundle (no src/); unpack the bundle first",
            field="algorithm",
        )
    src = src.resolve()
    parts = module_name.split(".")
    top = parts[0]
    if not _bundle_has_module(src, parts):
        raise PolicyError(
            f"algorithm {entry_point!r}: module {module_name!r} is not part of the algorithm's bundle; a job may "
            "only run code from its own bundle (or a built-in laulima.algorithms entry point)",
            field="algorithm",
        )
    existing = sys.modules.get(top)
    if existing is not None and not _module_inside(existing, src):
        raise PolicyError(
            f"algorithm {entry_point!r}: the name {top!r} is already taken in this process by a module outside "
            "the bundle; rename the bundle's package",
            field="algorithm",
        )
    if existing is None:
        spec = importlib.machinery.PathFinder.find_spec(top, [str(src)])
        if spec is None or spec.loader is None or not spec.origin or not _inside(Path(spec.origin), src):
            raise PolicyError(f"algorithm {entry_point!r}: module {top!r} cannot be found in its bundle")
        loader = spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[top] = module
        try:
            _run_bundle_code(lambda: loader.exec_module(module), entry_point, src)
        except BaseException:
            for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
                sys.modules.pop(name, None)
            raise
    target: ModuleType = _run_bundle_code(lambda: importlib.import_module(module_name), entry_point, src)
    if not _module_inside(target, src):
        raise PolicyError(f"algorithm {entry_point!r}: module {module_name!r} was not loaded from its bundle")
    return algorithm_class(target, attr, entry_point)


def _run_bundle_code(action: Any, entry_point: str, src: Path) -> Any:
    """Run the bundle's import; its failure becomes an AlgorithmError naming the bundle file and
    line (not the exception's text, which may hold the site's paths; that stays in ``__cause__``)."""
    try:
        return action()
    except LaulimaError:
        raise
    except Exception as exc:
        where = ""
        for frame in reversed(traceback.extract_tb(exc.__traceback__)):
            if frame.filename and _inside(Path(frame.filename), src):
                where = f" at {Path(frame.filename).resolve().relative_to(src).as_posix()} line {frame.lineno}"
                break
        raise AlgorithmError(
            f"algorithm {entry_point!r}: importing the bundle failed with {type(exc).__name__}{where}",
            field="algorithm",
        ) from exc


def _bundle_has_module(src: Path, parts: Sequence[str]) -> bool:
    """Whether ``src`` holds the module as a regular file (no links), looked up by path only."""
    here = src
    for part in parts[:-1]:
        here = here / part
        if not _is_real(here, stat.S_ISDIR):
            return False
    last = here / parts[-1]
    if _is_real(last.with_name(parts[-1] + ".py"), stat.S_ISREG):
        return True
    return _is_real(last, stat.S_ISDIR) and _is_real(last / "__init__.py", stat.S_ISREG)


def _is_real(path: Path, kind: Any) -> bool:
    try:
        return bool(kind(path.lstat().st_mode))
    except OSError:
        return False


def _module_inside(module: ModuleType, src: Path) -> bool:
    file = getattr(module, "__file__", None)
    if file:
        return _inside(Path(file), src)
    paths = list(getattr(module, "__path__", []) or [])
    return bool(paths) and all(_inside(Path(p), src) for p in paths)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except (ValueError, OSError):
        return False
    return True


# ---------------------------------------------------------------- built-ins


def is_builtin(entry_point: str) -> bool:
    """True for an entry point in a built-in package (``laulima.algorithms.*``, ``laulima.nnunet``)
    whose module exists in this Laulima and defines the name at its top level — found by path
    and syntax tree, nothing imported."""
    try:
        module, attr = _split_entry_point(entry_point)
    except _Invalid:
        return False
    if not is_builtin_name(entry_point):
        return False
    import laulima  # the root package only (already imported), so the hub may call this too

    parts = module.split(".")[1:]  # "algorithms", then the built-in's own modules
    spec = _find_spec_without_import(parts, list(laulima.__path__))
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return False
    try:
        tree = ast.parse(Path(spec.origin).read_bytes())
    except (OSError, SyntaxError, ValueError):
        return False
    names = _top_level_names(tree)
    return attr in names or "*" in names


# ---------------------------------------------------------------- signatures


class SigningKey(NamedTuple):
    """A scientist's Ed25519 key pair as PEM text: PKCS#8 private key (unencrypted — keep it
    private), SubjectPublicKeyInfo public key (what a site's policy lists)."""

    private_pem: str
    public_pem: str


def generate_signing_key() -> SigningKey:
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")
    public_pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )
    return SigningKey(private_pem, public_pem)


def sign(digest: str, private_key: str | bytes) -> str:
    """Sign a bundle digest; returns the Ed25519 signature as 128 lowercase hex characters.

    ``private_key``: PEM text (PKCS#8, unencrypted) as str or bytes, or the raw 32-byte key.
    What is signed is ``b"laulima-bundle-signature/1\\n" + digest``, never the bare digest."""
    _require_digest(digest, "bundle digest", ConfigurationError)
    key = _private_key(private_key)
    return key.sign(SIGNATURE_CONTEXT + digest.encode("ascii")).hex()


def _private_key(value: str | bytes) -> Ed25519PrivateKey:
    if isinstance(value, bytes) and len(value) == 32:
        try:
            return Ed25519PrivateKey.from_private_bytes(value)
        except ValueError:
            raise ConfigurationError("signing key: not a valid raw Ed25519 private key", field="key") from None
    try:
        key = serialization.load_pem_private_key(value.encode() if isinstance(value, str) else value, password=None)
    except TypeError:
        raise ConfigurationError(
            "signing key: the PEM key is encrypted; give an unencrypted PKCS#8 Ed25519 key "
            "(from `laulima algorithm keygen`)",
            field="key",
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigurationError("signing key: not a PEM private key or raw 32-byte Ed25519 key", field="key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigurationError(f"signing key: a {type(key).__name__}, not an Ed25519 key", field="key")
    return key
