"""The ``laulima`` commands of the secure path: the CA, enrolment, bundles, people's tokens.

Mounted by :mod:`laulima.cli`::

    laulima ca init | revoke | renew | list     the federation CA (operator)
    laulima site enroll NAME                    issue a site's certificate and bundle (operator)
    laulima site init BUNDLE --home DIR         install a bundle (hospital IT)
    laulima token create | list | revoke        people's API tokens (operator)
    laulima hub --tls-dir DIR/hub --host 0.0.0.0  the hub with mutual TLS
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from laulima.errors import ConfigurationError

__all__ = ["ca_app", "hub", "site_enroll", "site_init", "token_app"]

console = Console()

ca_app = typer.Typer(help="The federation's certificate authority (operator).", no_args_is_help=True)
token_app = typer.Typer(help="API tokens of people: operators and data scientists (operator).", no_args_is_help=True)

CaDir = Annotated[
    Path, typer.Option("--dir", "--ca-dir", envvar="LAULIMA_CA_DIR", help="The CA folder (keep it private).")
]
HubUrl = Annotated[str, typer.Option("--hub", envvar="LAULIMA_HUB_URL", help="Hub base URL.")]
Token = Annotated[str, typer.Option("--token", envvar="LAULIMA_TOKEN", help="Your API token.")]
CaFile = Annotated[
    Path | None,
    typer.Option("--ca", envvar="LAULIMA_CA_FILE", help="The federation CA certificate (ca.pem) for an https hub."),
]


def _day(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d")


# -- the CA ---------------------------------------------------------------------------
@ca_app.command("init")
def ca_init(
    directory: CaDir = Path(".laulima/ca"),
    hub_name: Annotated[
        list[str] | None,
        typer.Option("--hub-name", help="DNS name or IP address sites use to reach the hub (repeatable)."),
    ] = None,
    federation: Annotated[str, typer.Option(help="The federation's name, shown in certificates.")] = (
        "Laulima federation"
    ),
) -> None:
    """Create the federation CA (EC P-256, 5 years) and the hub's server certificate (90 days)."""
    from laulima.pki.ca import CertificateAuthority

    ca = CertificateAuthority.init(directory, federation=federation, hub_names=hub_name or [])
    console.print(f"federation CA created in [bold]{ca.dir}[/] (ca.key is private: back it up, never share it)")
    console.print(f"hub certificate for {', '.join([*(hub_name or []), 'localhost', '127.0.0.1', '::1'])}")
    console.print(
        f"the hub's folder is [bold]{ca.hub_dir}[/]: copy only that folder to the hub machine; the CA folder "
        "(ca.key) stays with you"
    )
    console.print(f"next: [bold]laulima hub --tls-dir {ca.hub_dir} --host 0.0.0.0[/], then `laulima site enroll NAME`")


@ca_app.command("revoke")
def ca_revoke(name: str, directory: CaDir = Path(".laulima/ca")) -> None:
    """Revoke every certificate of site NAME; a running hub refuses it from its next request."""
    from laulima.pki.ca import CertificateAuthority

    serials = CertificateAuthority.load(directory).revoke(name)
    if serials:
        console.print(
            f"site [bold]{name}[/]: {len(serials)} certificate(s) revoked ({', '.join(f'{s:x}' for s in serials)})"
        )
        console.print(
            f"the hub reads {directory}/hub/revoked.json: if the hub runs on another machine, copy that file to "
            "its TLS folder (a running hub picks it up without a restart)"
        )
    else:
        console.print(f"site [bold]{name}[/]: its certificates were already revoked")


@ca_app.command("renew")
def ca_renew(
    name: Annotated[str, typer.Argument(help="Site name, or 'hub' with --hub.")] = "hub",
    directory: CaDir = Path(".laulima/ca"),
    hub: Annotated[bool, typer.Option("--hub", help="Renew the hub's server certificate instead.")] = False,
    hub_url: Annotated[str | None, typer.Option("--hub-url", help="Hub URL written into the site's bundle.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Where to write the new bundle.")] = None,
    days: Annotated[int, typer.Option(help="Validity in days.")] = 90,
) -> None:
    """Issue a fresh certificate: the hub's (restart the hub), or a site's as a new bundle."""
    from laulima.pki.bundle import enroll_site
    from laulima.pki.ca import CertificateAuthority

    ca = CertificateAuthority.load(directory)
    if hub:
        issued = ca.issue_hub(ca.hub_names(), days=days)
        console.print(
            f"hub certificate renewed until {_day(issued.not_after)} in {ca.hub_dir}; copy hub.pem and hub.key to "
            "the hub's TLS folder and restart the hub"
        )
        return
    if hub_url is None:
        raise ConfigurationError("--hub-url is needed to write the site's new bundle", field="hub_url")
    path = enroll_site(ca.dir, name, hub_url, out, days=days)
    console.print(
        f"site [bold]{name}[/]: new certificate in [bold]{path}[/]; the site installs it with "
        f"`laulima site init {path.name} --home HOME` (its old certificate stays valid until it expires; "
        f"`laulima ca revoke` would end both)"
    )


@ca_app.command("list")
def ca_list(directory: CaDir = Path(".laulima/ca")) -> None:
    """Certificates issued by the CA, with their validity and revocation."""
    from laulima.pki.ca import CertificateAuthority, RevocationList

    ca = CertificateAuthority.load(directory, need_key=False)
    revoked = RevocationList(ca.revoked_file)
    table = Table("kind", "name", "serial", "valid until", "revoked")
    for kind in ("hub", "site"):
        for row in ca.issued(kind=kind):
            serial = int(str(row["serial"]), 16)
            table.add_row(
                kind,
                str(row["name"]),
                f"{serial:x}"[:16],
                _day(float(row["not_after"])),  # type: ignore[arg-type]
                "yes" if revoked.is_revoked(serial) else "",
            )
    console.print(table)


# -- sites --------------------------------------------------------------------------
def site_enroll(
    name: str,
    hub_url: Annotated[
        str, typer.Option("--hub-url", envvar="LAULIMA_HUB_URL", help="The https URL sites use to reach the hub.")
    ],
    directory: CaDir = Path(".laulima/ca"),
    out: Annotated[Path | None, typer.Option("--out", help="Bundle file (default NAME.laulima-site).")] = None,
    days: Annotated[int, typer.Option(help="Certificate validity in days.")] = 90,
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="LAULIMA_TOKEN", help="Operator token: also register NAME at the hub now."),
    ] = None,
    ca_file: CaFile = None,
) -> None:
    """(Operator) issue site NAME's key and certificate and write the bundle its admin installs."""
    from laulima.pki.bundle import enroll_site

    path = enroll_site(directory, name, hub_url, out, days=days)
    if token:
        from laulima.client import Client
        from laulima.errors import Conflict

        with Client(hub_url, token, ca_file=ca_file or Path(directory) / "ca.pem") as client:
            try:
                client.register_site(name)
            except Conflict:
                pass
    console.print(f"site [bold]{name}[/] enrolled: bundle [bold]{path}[/] (mode 0600: it holds the site's key)")
    console.print(f"send it to the site's admin over a trusted channel; they run `laulima site init {path.name}`")


def site_init(
    bundle: Annotated[Path | None, typer.Argument(help="The bundle from `laulima site enroll`.")] = None,
    home: Annotated[Path, typer.Option(help="The site's home folder.")] = Path(".laulima/site"),
    name: Annotated[str | None, typer.Option(help="Token mode only: the site's name.")] = None,
    hub_url: Annotated[
        str | None, typer.Option("--hub", envvar="LAULIMA_HUB_URL", help="Token mode only: hub URL.")
    ] = None,
    site_token: Annotated[
        str | None, typer.Option("--site-token", envvar="LAULIMA_SITE_TOKEN", help="Token mode only.")
    ] = None,
) -> None:
    """(Site admin) configure the agent in HOME from BUNDLE (or, on a loopback test hub, a token)."""
    if bundle is not None:
        from laulima.pki.bundle import install_bundle, read_bundle

        info = read_bundle(bundle)
        install_bundle(bundle, home)
        console.print(
            f"site [bold]{info.site}[/] configured in {home} for {info.hub_url} "
            f"(certificate valid until {_day(info.not_after)}); "
            "register data with `laulima site dataset add`, then `laulima site run`"
        )
        _write_default_policy(home)
        return
    if not (name and hub_url and site_token):
        raise ConfigurationError(
            "give the enrolment BUNDLE (laulima site init BUNDLE --home DIR), or for a loopback test hub "
            "--name, --hub and --site-token",
            field="bundle",
        )
    from laulima.site.settings import write_site_config

    write_site_config(home, name=name, hub_url=hub_url, token=site_token)
    console.print(f"site [bold]{name}[/] configured in {home}; register data with `laulima site dataset add`")
    _write_default_policy(home)


def _write_default_policy(home: Path) -> None:
    """Give the site a commented ``policy.toml`` (mode 0600) to review; never replace one.

    The agent runs under the same defaults without the file; writing it makes the rules
    visible where the administrator will look, and an existing policy is the hospital's
    decision, so a second ``site init`` (a renewed certificate) leaves it alone.
    """
    import os

    from laulima.site.policy import POLICY_FILE, default_policy_text

    path = home / POLICY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        console.print(f"site policy {path} kept as it is; check it with `laulima site policy check --home {home}`")
        return
    except OSError as exc:
        raise ConfigurationError(
            f"{path}: cannot write the site policy ({exc.strerror or exc})", file=str(path)
        ) from exc
    try:
        os.fchmod(fd, 0o600)  # the policy decides what code runs here: only its owner may edit it
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(default_policy_text())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    console.print(
        f"site policy written to {path}: built-in algorithms run, any other waits for `laulima site approve`; "
        f"review it, then `laulima site policy check --home {home}`"
    )


# -- people's tokens ------------------------------------------------------------------
@token_app.command("create")
def token_create(
    name: str,
    hub_url: HubUrl,
    token: Token,
    role: Annotated[str, typer.Option(help="scientist (experiments) or operator (everything).")] = "scientist",
    ca_file: CaFile = None,
) -> None:
    """Create an API token for NAME with ROLE; printed once, the hub keeps only its hash."""
    from laulima.client import Client

    if role not in ("scientist", "operator"):
        raise ConfigurationError(f"--role {role!r}: choose scientist or operator", field="role")
    with Client(hub_url, token, ca_file=ca_file) as client:
        created = client.create_token(name, role)
    console.print(f"token #{created.id} for [bold]{created.name}[/] ({created.role}), shown once:")
    print(created.token)


@token_app.command("list")
def token_list(hub_url: HubUrl, token: Token, ca_file: CaFile = None) -> None:
    """List API tokens (never their values)."""
    from laulima.client import Client

    with Client(hub_url, token, ca_file=ca_file) as client:
        tokens = client.list_tokens()
    table = Table("id", "name", "role", "created", "revoked")
    for t in tokens:
        table.add_row(str(t.id), t.name, t.role, _day(t.created_at), _day(t.revoked_at) if t.revoked_at else "")
    console.print(table)


@token_app.command("revoke")
def token_revoke(token_id: int, hub_url: HubUrl, token: Token, ca_file: CaFile = None) -> None:
    """Revoke API token TOKEN_ID at once."""
    from laulima.client import Client

    with Client(hub_url, token, ca_file=ca_file) as client:
        revoked = client.revoke_token(token_id)
    console.print(f"token #{revoked.id} of {revoked.name} revoked")


# -- the hub ----------------------------------------------------------------------------
def hub(
    home: Annotated[Path, typer.Option(help="Folder for the hub's database, blobs and keys.")] = Path(".laulima/hub"),
    host: Annotated[str, typer.Option(help="Address to bind (plain HTTP only on loopback).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8780,
    ca_dir: Annotated[
        Path | None,
        typer.Option(
            "--tls-dir",
            "--ca-dir",
            envvar="LAULIMA_HUB_CA_DIR",
            help="The hub's TLS folder (CA/hub from `laulima ca init`): serve HTTPS and require site certificates.",
        ),
    ] = None,
) -> None:
    """Run the federation hub (HTTPS with client certificates when --tls-dir is given)."""
    import logging

    from laulima.hub.server import serve
    from laulima.hub.settings import HubSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if ca_dir is None:
        serve(HubSettings(home=home, host=host, port=port))
    else:
        serve(HubSettings(home=home, host=host, port=port, ca_dir=ca_dir))
