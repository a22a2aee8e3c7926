"""``laulima algorithm``: a data scientist's bundles — pack, sign, inspect.

Mounted by :mod:`laulima.cli`::

    laulima algorithm pack SOURCE [--entry-point MOD:CLASS] write <digest>.bundle, print the digest
    laulima algorithm keygen --output KEYFILE               an Ed25519 signing key (0600) and its public key
    laulima algorithm pubkey --key KEYFILE                  print the public key of a signing key again
    laulima algorithm sign DIGEST --key KEYFILE             print the signature for a spec's `signatures`
    laulima algorithm show FILE [--source]                  verify a bundle; its digest, manifest, files

A site admits a bundle by its digest (``[algorithms] digests`` in ``policy.toml``) or by
who signed it (``[[algorithms.signers]]`` with the public key ``keygen`` prints). What goes
to stdout is what a script or a spec needs (the digest, the signature, the public key);
explanations go next to it. Errors are :mod:`laulima.errors` types, printed by
``laulima.cli.main`` as one red line with the exit code of their family.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from laulima.errors import ConfigurationError

__all__ = ["algorithm_app", "print_sources", "terminal_safe"]

console = Console(soft_wrap=True, highlight=False, emoji=False)
err_console = Console(stderr=True, soft_wrap=True, highlight=False, emoji=False)

algorithm_app = typer.Typer(help="Pack, sign and inspect algorithm bundles (data scientists).", no_args_is_help=True)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MAX_KEY_BYTES = 64 * 1024


@algorithm_app.command("pack")
def algorithm_pack(
    source: Annotated[str, typer.Argument(help="A package folder, a single .py file, or an importable module name.")],
    entry_point: Annotated[
        str | None,
        typer.Option(
            "--entry-point",
            help="The algorithm class, as package.module:Class (default: the one class deriving from Algorithm).",
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="The bundle's name (default: the package's).")] = None,
    version: Annotated[str, typer.Option(help="The bundle's version, for people reading the manifest.")] = "0",
    requirement: Annotated[
        list[str] | None,
        typer.Option(
            "--requirement", help="A PEP 508 requirement with a version range, e.g. 'torch>=2.2,<3' (repeatable)."
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="Where to write the bundle (default: ./<digest>.bundle).")
    ] = None,
) -> None:
    """Bundle the algorithm's Python sources; print the digest sites admit it by."""
    from laulima.algorithms.bundle import pack

    packed = pack(source, entry_point, name=name, version=version, requirements=requirement or ())
    path = packed.save(output if output is not None else Path(f"{packed.digest}.bundle"))
    manifest = packed.manifest
    console.print(f"bundle written to {path}", markup=False)
    console.print(f"digest        {packed.digest}", markup=False)
    console.print(f"name          {manifest.name} {manifest.version}", markup=False)
    console.print(f"entry point   {manifest.entry_point}", markup=False)
    console.print(f"requirements  {', '.join(manifest.requirements) or '(none)'}", markup=False)
    console.print(f"files         {len(manifest.files)} ({len(packed.data)} bytes packed)", markup=False)
    for skipped in packed.skipped:
        left_out = f"{terminal_safe(skipped.path)} ({terminal_safe(skipped.reason)})"
        err_console.print(f"[yellow]not in the bundle:[/] {escape(left_out)}")
    err_console.print(
        'name it in a spec as `bundle = "<digest>"` (or let `laulima experiment submit` pack `source`); '
        "sign it with `laulima algorithm sign DIGEST --key KEYFILE`",
        markup=False,
    )


@algorithm_app.command("keygen")
def algorithm_keygen(
    output: Annotated[Path, typer.Option("--output", help="The private key file to create (never overwritten).")],
) -> None:
    """Create an Ed25519 signing key (file mode 0600) and print its public key for sites' policies."""
    from laulima.algorithms.bundle import generate_signing_key

    key = generate_signing_key()
    _create_private(output, key.private_pem.encode("ascii"))
    public = _raw_public_b64(key.public_pem)
    console.print(f"private key written to {output} (mode 0600; it signs in your name: keep it private)", markup=False)
    console.print("public key, for a site's policy.toml:", markup=False)
    console.print(f'[[algorithms.signers]]\nname = "YOUR-NAME"\npublic_key = "{public}"', markup=False)


@algorithm_app.command("pubkey")
def algorithm_pubkey(
    key: Annotated[Path, typer.Option("--key", help="A private key file from `laulima algorithm keygen`.")],
) -> None:
    """Print the public key (base64 of its 32 raw bytes) of a signing key."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        private = serialization.load_pem_private_key(_read_key(key), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        private = None
    if not isinstance(private, Ed25519PrivateKey):
        raise ConfigurationError(
            f"{key}: not an unencrypted Ed25519 private key in PEM; use a key from `laulima algorithm keygen`",
            field="key",
            file=str(key),
        )
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    print(base64.b64encode(raw).decode("ascii"))


@algorithm_app.command("sign")
def algorithm_sign(
    digest: Annotated[str, typer.Argument(help="The bundle digest (64 hex digits), or the bundle file.")],
    key: Annotated[Path, typer.Option("--key", help="Your private key file from `laulima algorithm keygen`.")],
) -> None:
    """Sign a bundle digest; print the signature (128 hex digits) for a spec's `signatures = [...]`."""
    from laulima.algorithms.bundle import sign

    bundle_digest = _digest_of(digest)
    signature = sign(bundle_digest, _read_key(key))
    print(signature)
    err_console.print(
        f'signature of bundle {bundle_digest[:12]}…; in the spec: bundle = "{bundle_digest}" and '
        f'signatures = ["{signature[:16]}…"]',
        markup=False,
    )


@algorithm_app.command("show")
def algorithm_show(
    file: Annotated[Path, typer.Argument(help="A bundle file (<digest>.bundle).")],
    source: Annotated[bool, typer.Option("--source", help="Also print every source file.")] = False,
) -> None:
    """Verify a bundle and show its digest, manifest and files (and, with --source, their text)."""
    from laulima.algorithms.bundle import read_sources, verify

    digest = _file_digest(file)
    manifest = verify(file, digest)
    console.print(f"bundle        {file}", markup=False)
    console.print(f"digest        {digest} (verified)", markup=False)
    console.print(f"name          {manifest.name} {manifest.version}", markup=False)
    console.print(f"entry point   {manifest.entry_point}", markup=False)
    console.print(f"requirements  {', '.join(manifest.requirements) or '(none)'}", markup=False)
    console.print(f"files         {len(manifest.files)}", markup=False)
    for path, sha in sorted(manifest.files.items()):
        console.print(f"  {sha}  {terminal_safe(path)}", markup=False)
    if source:
        print_sources(read_sources(file, digest))


# -- shared with `laulima site jobs show --source` ---------------------------------------


def print_sources(sources: dict[str, str]) -> None:
    """Every file's text under a header naming it, control characters made visible.

    The source is someone else's code shown in an administrator's terminal: escape sequences
    could rewrite what the terminal shows, and bidirectional-override characters make code
    read differently from how it runs ("Trojan Source"). They are printed as ``\\x1b`` or
    ``\\u202e`` instead, and counted.
    """
    for path, text in sorted(sources.items()):
        shown, hidden = _visible(text)
        note = f"  ({hidden} control characters shown as \\x.. / \\u....)" if hidden else ""
        console.print(f"\n──── {terminal_safe(path)} ────{note}", markup=False)
        console.print(shown, markup=False, end="" if shown.endswith("\n") else "\n")


def _visible(text: str) -> tuple[str, int]:
    from laulima.algorithms.bundle import visible_text

    return visible_text(text)


def terminal_safe(text: str) -> str:
    """``text`` safe for one line of a terminal (see ``print_sources``)."""
    return _visible(text.replace("\n", " "))[0]


# -- keys and digests --------------------------------------------------------------------


def _create_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from its first byte; refuse to replace anything."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigurationError(
            f"{path} already exists; keygen never overwrites a key (what was signed with it would no longer match "
            "the public key sites list): choose another --output, or remove the old key yourself",
            field="output",
            file=str(path),
        ) from None
    except OSError as exc:
        raise ConfigurationError(
            f"{path}: cannot create the key file ({exc.strerror or exc}); check that its folder exists and is writable",
            field="output",
            file=str(path),
        ) from exc
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is masked by the umask
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _raw_public_b64(public_pem: str) -> str:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(public_pem.encode("ascii"))
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def _read_key(path: Path) -> bytes:
    """A private key file's bytes; warns when others may read it."""
    try:
        st = path.stat()
        with path.open("rb") as fh:
            data = fh.read(_MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise ConfigurationError(
            f"{path}: cannot read the signing key ({exc.strerror or exc}); create one with "
            "`laulima algorithm keygen --output FILE`",
            field="key",
            file=str(path),
        ) from exc
    if len(data) > _MAX_KEY_BYTES:
        raise ConfigurationError(f"{path}: too large to be a signing key", field="key", file=str(path))
    if os.name == "posix" and stat.S_IMODE(st.st_mode) & 0o077:
        err_console.print(
            f"warning: {path} may be read by other users (mode {stat.S_IMODE(st.st_mode):o}); "
            f"anyone who reads it can sign in your name: chmod 600 {path}",
            markup=False,
            style="yellow",
        )
    return data


def _digest_of(value: str) -> str:
    """A digest given as such, or the verified digest of a bundle file."""
    if _HEX64.fullmatch(value):
        return value
    path = Path(value)
    if path.is_file():
        from laulima.algorithms.bundle import verify

        digest = _file_digest(path)
        verify(path, digest)
        return digest
    raise ConfigurationError(
        f"{value!r:.80} is neither a bundle digest (64 lowercase hex digits, as `laulima algorithm pack` prints) "
        "nor a bundle file",
        field="digest",
    )


def _file_digest(path: Path) -> str:
    """The digest a bundle file must have: its name's, when it is ``<digest>.bundle``, else its content's.

    Taking the name's means a file renamed or altered after packing fails ``verify`` with both
    digests named, instead of silently showing as another bundle.
    """
    stem = path.name.removesuffix(".bundle")
    if _HEX64.fullmatch(stem):
        return stem
    try:
        with path.open("rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError as exc:
        raise ConfigurationError(
            f"{path}: cannot read the bundle ({exc.strerror or exc})", field="bundle", file=str(path)
        ) from exc
