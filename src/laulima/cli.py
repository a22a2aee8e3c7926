"""The ``laulima`` command: hub, site agent, experiments, and the local simulation."""

from __future__ import annotations

import enum
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from laulima.cli_algorithm import algorithm_app
from laulima.cli_nnunet import nnunet_app
from laulima.cli_security import ca_app, site_enroll, site_init, token_app
from laulima.cli_security import hub as hub_command
from laulima.cli_site_admin import (
    hub_audit_app,
    jobs_app,
    policy_app,
    site_approve,
    site_audit_app,
    site_privacy,
    site_reject,
    site_ui,
    ui_token_app,
)
from laulima.errors import (
    AlgorithmError,
    ConfigurationError,
    DataError,
    LaulimaError,
    PolicyError,
    PrivacyError,
    ProtocolError,
    TransportError,
)

__all__ = ["app", "main"]

app = typer.Typer(help="Laulima: federated learning for medical imaging.", no_args_is_help=True)
site_app = typer.Typer(help="Run and configure a hospital's site agent.", no_args_is_help=True)
dataset_app = typer.Typer(help="Register the site's local datasets.", no_args_is_help=True)
experiment_app = typer.Typer(help="Submit and follow experiments.", no_args_is_help=True)
app.add_typer(site_app, name="site")
app.add_typer(experiment_app, name="experiment")
site_app.add_typer(dataset_app, name="dataset")

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

#: Exit codes by error family; one place maps errors to codes.
EXIT_CODES: list[tuple[type[LaulimaError], int]] = [
    (ConfigurationError, 2),
    (DataError, 3),
    (ProtocolError, 4),
    (TransportError, 5),
    (AlgorithmError, 6),
    (PolicyError, 7),
    (PrivacyError, 7),
    (LaulimaError, 1),
]

HubUrl = Annotated[str, typer.Option("--hub", envvar="LAULIMA_HUB_URL", help="Hub base URL.")]
Token = Annotated[str, typer.Option("--token", envvar="LAULIMA_TOKEN", help="Your API token.")]

# The federation's identities: CA, site enrolment, people's tokens, and the TLS hub.
app.add_typer(ca_app, name="ca")
app.add_typer(token_app, name="token")
app.command("hub")(hub_command)
site_app.command("enroll")(site_enroll)
site_app.command("init")(site_init)

# Algorithm bundles (scientists); the site admin's policy, approvals and audit; the hub's record.
app.add_typer(algorithm_app, name="algorithm")
app.add_typer(hub_audit_app, name="hub-audit")
site_app.add_typer(policy_app, name="policy")
site_app.add_typer(jobs_app, name="jobs")
site_app.add_typer(site_audit_app, name="audit")

# Federated nnU-Net: planning from the federation's fingerprint, on the submitting machine.
app.add_typer(nnunet_app, name="nnunet")
site_app.command("approve")(site_approve)
site_app.command("reject")(site_reject)
site_app.command("privacy")(site_privacy)
site_app.command("ui")(site_ui)
site_app.add_typer(ui_token_app, name="ui-token")


def _fail(exc: LaulimaError) -> NoReturn:
    code = next(c for cls, c in EXIT_CODES if isinstance(exc, cls))
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(str(exc))}")  # a message's own brackets (laulima[ray]) stay
    sys.exit(code)


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# -- site -----------------------------------------------------------------------
@site_app.command("register")
def site_register(name: str, hub_url: HubUrl, token: Token) -> None:
    """(Operator) create a site at the hub and print its token, shown only once."""
    from laulima.client import Client

    with Client(hub_url, token) as client:
        created = client.register_site(name)
    if created.token is None:  # a TLS hub: the site's identity is its certificate
        console.print(f"site [bold]{created.name}[/] registered; issue its certificate with `laulima site enroll`")
        return
    console.print(f"site [bold]{created.name}[/] registered; its token (shown once):")
    print(created.token)


@site_app.command("list")
def site_list(hub_url: HubUrl, token: Token) -> None:
    """(Operator) every site: online / offline / revoked / removed, last contact, version, cohorts."""
    import time

    from laulima.client import Client

    with Client(hub_url, token) as client:
        sites = client.list_sites()
    table = Table("site", "status", "last contact", "version", "datasets (cases)")
    now = time.time()
    for site in sites:
        seen = "never" if site.last_seen is None else f"{max(0.0, now - site.last_seen):.0f} s ago"
        cohorts = ", ".join(f"{k} ({'?' if v is None else v})" for k, v in sorted(site.datasets.items()))
        table.add_row(site.name, site.status.value, seen, site.version or "?", cohorts or "-")
    console.print(table)


@site_app.command("remove")
def site_remove(name: str, hub_url: HubUrl, token: Token) -> None:
    """(Operator) deregister site NAME: its agent is refused and no round waits for it."""
    from laulima.client import Client

    with Client(hub_url, token) as client:
        removed = client.remove_site(name)
    console.print(
        f"site [bold]{removed.name}[/] removed: its open tasks are cancelled and its agent is refused; "
        "`laulima site register` brings it back"
    )


@site_app.command("predict")
def site_predict(
    model: Annotated[Path, typer.Option(help="An exported model folder (`laulima experiment export`).")],
    dataset: Annotated[str, typer.Option(help="A dataset registered at this site.")],
    out: Annotated[Path, typer.Option(help="Folder for <case_id>.nii.gz and, for DICOM cases, <case_id>.seg.dcm.")],
    home: Annotated[Path, typer.Option(help="The site's home folder.")],
    stow: Annotated[
        str | None, typer.Option("--stow", metavar="URL", help="Send the SEGs to this DICOMweb root (STOW-RS).")
    ] = None,
) -> None:
    """Segment every case of a registered dataset; DICOM cases also get a DICOM SEG on their series.

    A failing case is reported and the others go on; the command then exits non-zero, naming it.
    """
    from rich.markup import escape

    from laulima.site.predict import CaseOutcome, predict_dataset

    def show(outcome: CaseOutcome) -> None:
        line = escape(outcome.summary())  # case ids and errors are data, never markup
        console.print(line if outcome.ok else f"[red]{line}[/]")

    result = predict_dataset(model, home, dataset, out, stow_url=stow, on_case=show)
    done = len(result.cases) - len(result.failed)
    console.print(f"{done} of {len(result.cases)} case(s) of {dataset} segmented → {escape(str(out))}")
    if result.stowed:
        console.print(f"{len(result.stowed)} DICOM SEG(s) sent to {escape(str(stow))}")
    failed = ""
    if result.failed:
        names = ", ".join(c.case_id for c in result.failed)
        failed = f"{len(result.failed)} case(s) failed: {names}; their errors are above"
    if result.stow_error is not None:
        also = f"; {failed}" if failed else ""
        raise TransportError(f"the SEGs are in {out} but were not sent: {result.stow_error}{also}")
    if failed:
        raise DataError(failed, dataset=dataset)


@site_app.command("run")
def site_run(
    home: Annotated[Path, typer.Option(help="The site's home folder.")],
    verbose: bool = False,
) -> None:
    """Run the site agent: pull tasks, train locally, send back updates."""
    from laulima.site.agent import run_agent
    from laulima.site.settings import SiteSettings

    _logging(verbose)
    run_agent(SiteSettings.load(home))


@dataset_app.command("add")
def dataset_add(
    name: str,
    source: Annotated[
        str,
        typer.Argument(
            metavar="SOURCE",
            help="Decathlon / nnU-Net v2 folder, DICOM tree, other folder, or a PACS query "
            "dicomweb+https://HOST/dicom-web?Modality=MR&StudyDescription=...",
        ),
    ],
    home: Annotated[Path, typer.Option(help="The site's home folder.")],
    labels: Annotated[
        Path | None, typer.Option(help="DICOM: folder of NIfTI labels named <SeriesInstanceUID>.nii.gz.")
    ] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="A tag for the dataset (repeatable).")] = None,
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="DICOM: register the good cases, record the bad ones.")
    ] = False,
    ca_file: Annotated[Path | None, typer.Option(help="PACS over https: the CA that signed its certificate.")] = None,
    allow_plaintext_http: Annotated[
        bool, typer.Option(help="PACS: allow dicomweb+http:// to a host other than this machine (unencrypted).")
    ] = False,
    max_studies: Annotated[int, typer.Option(min=1, max=1_000_000, help="PACS: most studies one query may match.")] = (
        1000
    ),
    max_instances: Annotated[
        int, typer.Option(min=1, max=100_000_000, help="PACS: most instances one query may retrieve.")
    ] = 10_000,
) -> None:
    """Check every case of SOURCE, then register it under NAME (nothing is registered if a case is bad)."""
    from rich.markup import escape

    from laulima.site.catalog import Catalog

    catalog = Catalog(home)
    if source.startswith("dicomweb+"):
        from laulima.site.pacs import register_pacs_dataset

        target, retrieval = register_pacs_dataset(
            catalog,
            name,
            source,
            ca_file=ca_file,
            allow_plaintext=allow_plaintext_http,
            max_studies=max_studies,
            max_instances=max_instances,
            labels=labels,
            tags=tag or (),
            skip_bad=skip_bad,
        )
        console.print(
            f"PACS: {retrieval.studies} study(ies), {retrieval.series} series, {retrieval.instances} instances "
            f"({retrieval.fetched} series fetched, {retrieval.cached} from the cache)"
        )
    else:
        target = catalog.add(name, Path(source), labels=labels, tags=tag or (), skip_bad=skip_bad)
    info = catalog.info(name)
    cases = "no case list" if info.n_cases is None else f"{info.n_cases} case(s)"
    console.print(f"dataset [bold]{escape(name)}[/] ({info.kind}, {cases}) → {escape(str(target))}")
    if info.skipped:
        console.print(f"[yellow]skipped {len(info.skipped)}:[/]")
        for line in info.skipped:
            console.print(f"  {escape(line)}", soft_wrap=True)


@dataset_app.command("list")
def dataset_list(home: Annotated[Path, typer.Option(help="The site's home folder.")]) -> None:
    """List the registered datasets: name, kind, cases, tags, source."""
    from laulima.site.catalog import Catalog

    catalog = Catalog(home)
    table = Table("name", "kind", "cases", "tags", "source")
    for name in catalog.list():
        info = catalog.info(name)
        cases = "?" if info.n_cases is None else str(info.n_cases)
        if info.skipped:
            cases += f" ({len(info.skipped)} skipped)"
        table.add_row(name, info.kind, cases, ", ".join(info.tags), info.source)
    console.print(table)


@dataset_app.command("show")
def dataset_show(name: str, home: Annotated[Path, typer.Option(help="The site's home folder.")]) -> None:
    """One dataset, case by case: modality, series, shape, spacing, orientation, label."""
    from rich.markup import escape

    from laulima.site.catalog import Catalog

    catalog = Catalog(home)
    info = catalog.info(name)
    console.print(f"[bold]{escape(name)}[/] ({info.kind}) from {escape(info.source)} → {escape(str(info.path))}")
    if info.tags:
        console.print(f"tags: {', '.join(info.tags)}")
    table = Table("case", "split", "modality", "series", "shape", "spacing (mm)", "orient.", "label", "checksum")
    for case in catalog.cases(name):
        shape = "x".join(str(n) for n in case.shape) if case.shape else "?"
        spacing = "x".join(f"{v:.3g}" for v in case.spacing) if case.spacing else "?"
        table.add_row(
            case.case_id, case.split, case.modality, case.series_description, shape, spacing, case.orientation,
            "yes" if case.has_label else "no", case.checksum[:12],
        )  # fmt: skip
    console.print(table)
    for line in info.skipped:
        console.print(f"[yellow]skipped:[/] {escape(line)}", soft_wrap=True)


@dataset_app.command("remove")
def dataset_remove(name: str, home: Annotated[Path, typer.Option(help="The site's home folder.")]) -> None:
    """Forget dataset NAME (its source files are not touched)."""
    from laulima.site.catalog import Catalog

    Catalog(home).remove(name)
    console.print(f"dataset [bold]{name}[/] removed")


@dataset_app.command("verify")
def dataset_verify(name: str, home: Annotated[Path, typer.Option(help="The site's home folder.")]) -> None:
    """Check every file of NAME against its checksum from registration; exit 3 if any changed or is gone."""
    from laulima.site.catalog import Catalog

    problems = Catalog(home).verify(name)
    for line in problems:
        print(line)
    if problems:
        err_console.print(
            f"[bold red]error:[/] dataset {name}: {len(problems)} file(s) changed or gone since registration; "
            f"restore them or re-register with `laulima site dataset add {name} SOURCE`"
        )
        sys.exit(3)
    console.print(f"dataset [bold]{name}[/]: every file as registered")


# -- experiments ----------------------------------------------------------------
BundleFile = Annotated[
    Path | None, typer.Option("--bundle", help="The file of the bundle the spec names (default: DIGEST.bundle).")
]
SigningKeys = Annotated[
    list[Path] | None, typer.Option("--sign", help="Sign the bundle with this key (laulima algorithm keygen).")
]


@experiment_app.command("submit")
def experiment_submit(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC")],
    hub_url: HubUrl,
    token: Token,
    bundle: BundleFile = None,
    sign_with: SigningKeys = None,
) -> None:
    """Validate SPEC, pack its algorithm's `source` into a bundle, build the initial model, submit."""
    from laulima.client import Client
    from laulima.core.spec import load_spec
    from laulima.submission import prepare

    spec = load_spec(spec_path)
    ready = prepare(spec, base_dir=spec_path.parent, bundle_file=bundle, signing_keys=sign_with or ())
    with Client(hub_url, token) as client:
        exp = client.submit(ready.spec, ready.initial_weights, bundle=ready.bundle.data if ready.bundle else None)
    console.print(f"experiment [bold]{exp.id}[/] ({exp.name}) submitted: {exp.rounds} rounds")
    if ready.bundle is not None:
        console.print(f"algorithm bundle {ready.bundle.digest} ({ready.bundle.manifest.entry_point})")
        for skipped in ready.bundle.skipped:
            console.print(f"[yellow]not in the bundle:[/] {skipped.path} ({skipped.reason})")


@experiment_app.command("evaluate")
def experiment_evaluate(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="An exported model folder, or a .safetensors file.")],
    hub_url: HubUrl,
    token: Token,
    sites: Annotated[
        str | None, typer.Option("--sites", help="Comma-separated sites to evaluate at (default: the spec's, or all).")
    ] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="The sites' dataset name (or tag:NAME).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="The experiment's name.")] = None,
    spec_path: Annotated[
        Path | None,
        typer.Option("--spec", help="A TOML spec (algorithm, dataset, [config]); needed for a bare .safetensors."),
    ] = None,
    bundle: BundleFile = None,
    sign_with: SigningKeys = None,
) -> None:
    """Evaluate MODEL at the sites, without training: an experiment of mode "evaluate" whose
    per-site results `laulima experiment cross-site ID` shows."""
    from laulima.client import Client
    from laulima.submission import prepare_evaluation

    site_list = [x.strip() for x in sites.split(",") if x.strip()] if sites is not None else None
    ready = prepare_evaluation(
        model,
        spec_file=spec_path,
        sites=site_list,
        dataset=dataset,
        name=name,
        bundle_file=bundle,
        signing_keys=sign_with or (),
    )
    with Client(hub_url, token) as client:
        exp = client.submit(ready.spec, ready.initial_weights, bundle=ready.bundle.data if ready.bundle else None)
    where = ", ".join(exp.spec.get("sites") or []) or "every site"
    console.print(f"experiment [bold]{exp.id}[/] ({exp.name}) submitted: evaluates {model} at {where}")
    console.print(f"results: `laulima experiment cross-site {exp.id}`")


@experiment_app.command("fingerprint")
def experiment_fingerprint(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC")],
    hub_url: HubUrl,
    token: Token,
    out: Annotated[Path, typer.Option("--out", help="Folder for dataset_fingerprint.json and dataset.json.")] = Path(
        "."
    ),
    sites: Annotated[
        str | None, typer.Option("--sites", help="Comma-separated sites to ask (default: the spec's, or all).")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="The experiment's name (default: NAME-fingerprint).")
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1.0, help="Seconds to wait for the sites before giving up.")
    ] = 3600.0,
    bundle: BundleFile = None,
    sign_with: SigningKeys = None,
) -> None:
    """Have the sites of SPEC compute the dataset fingerprint of their cohorts, wait, and write
    the merge as nnU-Net's dataset_fingerprint.json and dataset.json in --out.

    SPEC may be the spec you train with: it is submitted with mode = "fingerprint", and its
    training settings (rounds, local_steps, strategy, [evaluation], ...) are left out, so the
    fingerprint covers the same algorithm, dataset, cohort and sites. No model is built."""
    import time

    from rich.markup import escape

    from laulima.client import Client
    from laulima.nnunet.workflow import DATASET_FILE, FINGERPRINT_FILE, write_plan_files
    from laulima.submission import prepare_fingerprint

    site_list = [x.strip() for x in sites.split(",") if x.strip()] if sites is not None else None
    ready, dropped = prepare_fingerprint(
        spec_path, sites=site_list, name=name, bundle_file=bundle, signing_keys=sign_with or ()
    )
    if dropped:
        console.print(f"left out of the fingerprint experiment (training settings): {', '.join(dropped)}")
    with Client(hub_url, token) as client:
        exp = client.submit(ready.spec, ready.initial_weights, bundle=ready.bundle.data if ready.bundle else None)
        where = ", ".join(exp.spec.get("sites") or []) or "every site"
        console.print(f"experiment [bold]{exp.id}[/] ({exp.name}) submitted: dataset fingerprint at {where}")
        deadline = time.monotonic() + timeout
        shown: dict[str, str] = {}
        while exp.status == "running":
            for site, note in sorted(exp.site_notes.items()):  # sites' own words: never read as markup
                if shown.get(site) != note:
                    shown[site] = note
                    console.print(f"[yellow]{escape(site)}[/]: {escape(note)}")
            if time.monotonic() >= deadline:
                err_console.print(
                    f"[bold red]error:[/] experiment {exp.id} still running after {timeout:g} s; follow it with "
                    f"`laulima experiment status {exp.id}`"
                )
                raise typer.Exit(5)
            time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
            exp = client.experiment(exp.id)
        if exp.status != "completed":
            err_console.print(f"[bold red]error:[/] experiment {exp.id} {exp.status}: {escape(exp.error or '')}")
            for site, note in sorted(exp.site_notes.items()):
                err_console.print(f"  {escape(site)}: {escape(note)}")
            raise typer.Exit(1)
        merged = client.fingerprint(exp.id)
    write_plan_files(out, merged.fingerprint, merged.dataset_json)
    console.print(
        f"fingerprint of {merged.n_cases} cases from {', '.join(merged.sites)} → "
        f"{out / FINGERPRINT_FILE}, {out / DATASET_FILE}"
    )
    for site, why in sorted(merged.failures.items()):  # sites' own words: never read as markup
        console.print(f"[yellow]not included: {escape(site)}[/]: {escape(why)}")


@experiment_app.command("cross-site")
def experiment_cross_site(
    experiment_id: int,
    hub_url: HubUrl,
    token: Token,
    metric: Annotated[str, typer.Option("--metric", help="The metric to tabulate.")] = "dice_mean",
) -> None:
    """Show the evaluation after training as a table: one row per model (the global model, each
    site's local-only model), the pooled value (n_samples-weighted) and one column per site."""
    from rich.markup import escape

    from laulima.client import Client

    with Client(hub_url, token) as client:
        matrix = client.cross_site(experiment_id)
    shown = metric
    names = {m for row in matrix.cells.values() for cell in row.values() for m in cell.metrics}
    if names and metric not in names:
        shown = sorted(names)[0]
        console.print(
            f"[yellow]no metric {escape(metric)!r}; showing {escape(shown)!r} (have: {', '.join(sorted(names))})[/]"
        )
    title = f"experiment {experiment_id}: {shown}" + ("" if matrix.complete else " (still running)")
    table = Table("model", "pooled", *[escape(site) for site in matrix.sites], title=title)
    for model in matrix.models:
        row = matrix.cells.get(model, {})
        pooled = matrix.pooled.get(model)
        cells = [
            _cell(row[site].metrics.get(shown), row[site].n_samples) if site in row else "-" for site in matrix.sites
        ]
        total = _cell(pooled.metrics.get(shown), pooled.n_samples) if pooled else "-"
        table.add_row(escape(model), total, *cells)
    console.print(table)
    for f in matrix.failures:  # sites' own words: never read as markup
        console.print(f"[yellow]{escape(f.model)} at {escape(f.site)} ({f.kind})[/]: {escape(f.reason)}")


def _cell(value: float | None, n: int) -> str:
    return "-" if value is None else f"{value:.4f} (n={n})"


@experiment_app.command("list")
def experiment_list(hub_url: HubUrl, token: Token) -> None:
    """List experiments."""
    from laulima.client import Client

    with Client(hub_url, token) as client:
        exps = client.experiments()
    table = Table("id", "name", "owner", "status", "rounds", "error")
    for e in exps:
        table.add_row(str(e.id), e.name, e.owner, e.status, f"{e.rounds_done}/{e.rounds}", e.error or "")
    console.print(table)


@experiment_app.command("status")
def experiment_status(experiment_id: int, hub_url: HubUrl, token: Token) -> None:
    """Show one experiment: what its sites are doing (waiting for approval, refused, failed),
    rounds, per-site metrics, refused updates."""
    from rich.markup import escape

    from laulima.client import Client
    from laulima.terminal import metrics_table, privacy_settings, privacy_settings_line, privacy_table

    with Client(hub_url, token) as client:
        exp = client.experiment(experiment_id)
        rounds = client.rounds(experiment_id)
        metrics = client.metrics(experiment_id)
        refusals = client.refusals(experiment_id)
    if exp.mode == "evaluate":
        console.print(f"[bold]{exp.name}[/] (#{exp.id}) {exp.status}, evaluation of a given model")
    elif exp.mode == "fingerprint":
        console.print(f"[bold]{exp.name}[/] (#{exp.id}) {exp.status}, dataset fingerprint of the sites' cohorts")
    else:
        console.print(f"[bold]{exp.name}[/] (#{exp.id}) {exp.status}, round {exp.rounds_done}/{exp.rounds}")
    if exp.phase is not None:
        console.print(f"phase: {exp.phase}")
    if exp.error:
        console.print(f"[red]{exp.error}[/]")
    if exp.waiting:
        console.print(f"[yellow]{exp.waiting}[/]")
    if exp.algorithm_digest:
        console.print(f"algorithm {escape(str(exp.spec.get('algorithm', '?')))} ({exp.algorithm_digest[:12]})")
    if (privacy := privacy_settings(exp.spec)) is not None:
        console.print(escape(privacy_settings_line(privacy)))
    for site, note in sorted(exp.site_notes.items()):  # sites' own words: never read as markup
        colour = "yellow" if note.startswith("waiting") else "red"
        console.print(f"[{colour}]{escape(site)}[/]: {escape(note)}")
    table = Table("round", "status", "sites", "updates", "left out")
    for r in rounds:
        left_out = "; ".join(f"{site}: {why}" for site, why in sorted(r.left_out.items()))
        table.add_row(str(r.index), r.status, ", ".join(r.sites), str(r.n_updates), left_out)
    console.print(table)
    console.print(metrics_table(metrics))
    if (epsilons := privacy_table(metrics, delta=(privacy or {}).get("delta"))) is not None:
        console.print(epsilons)  # the sites' train records: metrics_table shows the evaluations only
    for ref in refusals:
        console.print(f"[yellow]refused[/] {ref.site} task {ref.task_id}: {ref.status} {ref.reason}")


@experiment_app.command("cancel")
def experiment_cancel(experiment_id: int, hub_url: HubUrl, token: Token) -> None:
    """Cancel a running experiment; its open tasks are withdrawn."""
    from laulima.client import Client

    with Client(hub_url, token) as client:
        exp = client.cancel(experiment_id)
    console.print(f"experiment {exp.id} is {exp.status}")


@experiment_app.command("share")
def experiment_share(experiment_id: int, name: str, hub_url: HubUrl, token: Token) -> None:
    """Let the person NAME (the name of their API token) read experiment ID; owner or operator only."""
    from laulima.client import Client

    with Client(hub_url, token) as client:
        exp = client.share(experiment_id, name)
    console.print(f"experiment {exp.id} ({exp.name}) of {exp.owner} is shared with {', '.join(exp.shared_with)}")


@experiment_app.command("unshare")
def experiment_unshare(experiment_id: int, name: str, hub_url: HubUrl, token: Token) -> None:
    """Stop sharing experiment ID with the person NAME."""
    from laulima.client import Client

    with Client(hub_url, token) as client:
        exp = client.unshare(experiment_id, name)
    shared = ", ".join(exp.shared_with) or "nobody else"
    console.print(f"experiment {exp.id} ({exp.name}) of {exp.owner} is shared with {shared}")


@experiment_app.command("model")
def experiment_model(
    experiment_id: int,
    hub_url: HubUrl,
    token: Token,
    output: Annotated[Path, typer.Option(help="Where to write the safetensors file.")] = Path("model.safetensors"),
    model: Annotated[
        str | None,
        typer.Option("--model", help="global (default), or local:SITE: a site's local-only model (cross-site)."),
    ] = None,
) -> None:
    """Download the newest global model (or a local-only one) as bare weights (safetensors); `laulima experiment
    export` builds the model folder that `laulima predict` runs."""
    from laulima.client import Client

    with Client(hub_url, token) as client:
        client.download_model(experiment_id, output, model=model)
    console.print(f"{model or 'global'} model of experiment {experiment_id} → {output}")


@experiment_app.command("export")
def experiment_export(
    experiment_id: int,
    hub_url: HubUrl,
    token: Token,
    output: Annotated[Path, typer.Option(help="The model folder to write (replaced if it exists).")],
) -> None:
    """Write a finished experiment's global model as the model folder `laulima predict` runs.

    The folder `laulima demo` writes: weights (safetensors), TorchScript, and a card with
    the architecture and preprocessing plan from the experiment's spec.
    """
    from laulima.client import Client
    from laulima.export import export_experiment

    with Client(hub_url, token) as client:
        written = export_experiment(client, experiment_id, output)
    console.print(f"model of experiment {experiment_id} → {written}; run `laulima predict --model {written} ...`")


@experiment_app.command("tensorboard")
def experiment_tensorboard(
    experiment_id: int,
    hub_url: HubUrl,
    token: Token,
    logdir: Annotated[Path, typer.Option(help="TensorBoard log folder.")] = Path("runs"),
) -> None:
    """Write the experiment's per-site and global metrics as TensorBoard event files."""
    from laulima.client import Client
    from laulima.tracking import write_tensorboard

    with Client(hub_url, token) as client:
        exp = client.experiment(experiment_id)
        path = write_tensorboard(logdir / f"{exp.id}-{exp.name}", client.metrics(experiment_id))
    console.print(f"TensorBoard logs → {path}; view with `tensorboard --logdir {logdir}`")


# -- simulation -------------------------------------------------------------------
class SimEngine(enum.StrEnum):
    """How `laulima sim` runs the site agents."""

    processes = "processes"
    ray = "ray"


@app.command()
def sim(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="Experiment spec (TOML).")],
    sites: Annotated[int, typer.Option("--sites", help="Number of site agents.")] = 3,
    workdir: Annotated[Path, typer.Option(help="Where hub, sites and data live.")] = Path("laulima-sim"),
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the result as JSON.")] = None,
    engine: Annotated[
        SimEngine,
        typer.Option(
            help="processes: one OS process per site agent (a few dozen sites). ray: the agents as Ray actors, "
            "several to an actor, for 100 sites and more; on a local Ray instance, or on the cluster that "
            "RAY_ADDRESS names (on this machine's node). Needs pip install 'laulima\\[ray]'.",
        ),
    ] = SimEngine.processes,
    sites_per_actor: Annotated[
        int | None,
        typer.Option(min=1, help="With --engine ray: site agents per Ray actor (default: one actor per CPU)."),
    ] = None,
) -> None:
    """Run SPEC on a local federation: a hub and N site agents, as they would run in hospitals.

    The hub is a real process on loopback, with mutual TLS and a throwaway CA; each site has
    its own home folder, catalog, policy and audit trail, and runs every task in a process of
    its own. --engine processes (the default) starts one `laulima site run` process per site;
    --engine ray hosts the agents in Ray actors (one per CPU, each running a group of agents),
    which holds 100-200 sites on a laptop.
    """
    from laulima.core.spec import load_spec

    if sites_per_actor is not None and engine != SimEngine.ray:
        raise ConfigurationError("--sites-per-actor needs --engine ray", field="sites_per_actor")
    _run_sim(load_spec(spec_path), sites, workdir, json_out, engine=engine.value, sites_per_actor=sites_per_actor)


@app.command()
def demo(
    quick: Annotated[bool, typer.Option("--quick", help="The short preset (under 5 minutes on 2 cores).")] = False,
    preset: Annotated[str | None, typer.Option(help="Preset name: quick, default or test.")] = None,
    workdir: Annotated[Path, typer.Option(help="Where phantoms, hub, sites and the report go.")] = Path("laulima-demo"),
    baselines: Annotated[bool, typer.Option(help="Also train the centralized and local-only baselines.")] = True,
    task: Annotated[
        str, typer.Option(help="brain-tumour (the headline) or brain-tissue (CSF, grey and white matter).")
    ] = "brain-tumour",
    strategy_comparison: Annotated[
        Path | None,
        typer.Option(help="JSON lines of benchmarks/strategies.py to include in the report."),
    ] = None,
    dp: Annotated[
        bool,
        typer.Option(
            "--dp",
            help="Site-level differential privacy: every site clips and noises its update (target ε 8, δ 1e-5; "
            "distributed noise with --secure-aggregation, else local). No local-only models then.",
        ),
    ] = False,
    epsilon: Annotated[
        float | None,
        typer.Option("--epsilon", min=0.01, help="The target ε over all rounds (implies --dp; default 8)."),
    ] = None,
    secure_aggregation: Annotated[
        bool,
        typer.Option(
            "--secure-aggregation",
            help="Secure aggregation: the hub learns only the sum of the sites' masked updates. No local-only "
            "models then.",
        ),
    ] = False,
    privacy_utility: Annotated[
        Path | None,
        typer.Option(help="The JSON line of benchmarks/privacy_utility.py to plot in the report (Dice against ε)."),
    ] = None,
) -> None:
    """Federated brain tumour segmentation across three simulated hospitals, with a report."""
    import dataclasses

    from laulima.demo import DEFAULT_EPSILON, presets, read_privacy_utility, read_strategy_comparison, run_demo

    available = presets(task)
    name = preset or ("quick" if quick else "default")
    if name not in available:
        raise ConfigurationError(f"--preset {name!r}: choose one of {', '.join(available)}", field="preset")
    chosen = available[name]
    if dp or epsilon is not None:
        chosen = dataclasses.replace(chosen, target_epsilon=epsilon if epsilon is not None else DEFAULT_EPSILON)
    if secure_aggregation:
        chosen = dataclasses.replace(chosen, secure_aggregation=True)
    rows = read_strategy_comparison(strategy_comparison) if strategy_comparison is not None else None
    utility = read_privacy_utility(privacy_utility) if privacy_utility is not None else None
    run_demo(chosen, workdir, console, baselines=baselines, strategy_comparison=rows, privacy_utility=utility)


@app.command()
def baseline(
    mode: Annotated[str, typer.Option(help="central: all sites' training data pooled; local: each site alone.")],
    spec_path: Annotated[Path, typer.Option("--spec", help="The federated experiment's spec (its budget and config).")],
    site: Annotated[list[str], typer.Option(help="NAME=DATASET_DIR, once per site.")],
    steps: Annotated[
        int | None,
        typer.Option(help="Steps per model (default: the federated total; for local, one site's share)."),
    ] = None,
    output: Annotated[Path, typer.Option(help="Where to write the evaluation (JSON).")] = Path("baseline.json"),
) -> None:
    """Train the comparison models on the same budget and evaluate them on every site's test data."""
    from laulima.baselines import run_baseline
    from laulima.core.spec import load_spec

    if mode not in ("central", "local"):
        raise ConfigurationError(f"--mode {mode!r}: choose central or local", field="mode")
    spec = load_spec(spec_path)
    datasets: dict[str, Path] = {}
    for item in site:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigurationError(f"--site {item!r}: expected NAME=DATASET_DIR", field="site")
        datasets[name] = Path(path)
    per_site = spec.rounds * spec.local_steps
    budget = steps if steps is not None else (per_site * len(datasets) if mode == "central" else per_site)
    if budget <= 0:
        raise ConfigurationError("the spec sets no local_steps; give the budget with --steps", field="steps")
    with console.status(f"{mode} baseline: {budget} optimizer steps per model…"):
        result = run_baseline(
            "central" if mode == "central" else "local", datasets, dict(spec.config), steps=budget, seed=spec.seed
        )
    output.write_text(json.dumps(result.to_json(), indent=2))
    console.print(f"{mode} baseline → {output}")


@app.command()
def predict(
    model: Annotated[
        Path,
        typer.Option(
            help="A model folder (model.json card, weights, TorchScript) written by `laulima demo` or "
            "`laulima experiment export`; not the bare .safetensors of `laulima experiment model`."
        ),
    ],
    input_path: Annotated[Path, typer.Option("--input", help="A NIfTI file or a DICOM series folder.")],
    output: Annotated[Path, typer.Option(help="The label map to write (.nii.gz), or a folder for <input>_seg.nii.gz.")],
    seg: Annotated[
        Path | None,
        typer.Option("--seg", help="DICOM input only: where to write the DICOM SEG (default: <output stem>.seg.dcm)."),
    ] = None,
) -> None:
    """Segment an image with a trained model, at any voxel size and orientation.

    The image is resampled to the model's training grid (its card's preprocessing plan),
    segmented, and the labels mapped back onto the image's own grid.
    """
    from laulima.predict import predict as run_predict

    written = run_predict(model, input_path, output)
    console.print(f"segmentation → {written}")
    from laulima.site.predict import write_prediction_seg  # a DICOM input also gets a SEG on its series

    if (seg_written := write_prediction_seg(model, input_path, written, seg)) is not None:
        console.print(f"DICOM SEG → {seg_written}")


def _run_sim(
    spec: object,
    sites: int,
    workdir: Path,
    json_out: Path | None,
    *,
    engine: str = "processes",
    sites_per_actor: int | None = None,
) -> None:
    from laulima.core.spec import ExperimentSpec
    from laulima.nnunet.workflow import needs_plan
    from laulima.sim import LocalFederation, ProcessEngine, run_simulation
    from laulima.terminal import SimProgress, metrics_table

    assert isinstance(spec, ExperimentSpec)
    how = ProcessEngine.description if engine == "processes" else "hub on loopback, site agents as Ray actors"
    console.print(
        f"[bold]{spec.name}[/]: {spec.rounds} rounds of {spec.strategy.name} on {sites} sites "
        f"({how}; logs in {workdir})"
    )
    if needs_plan(spec):
        console.print("nnU-Net: the sites fingerprint their cohorts first, then nnU-Net's planner plans here")

    def started(fed: LocalFederation) -> None:
        if engine != "processes":
            console.print(f"{len(fed.sites)} {fed.agents.description}")

    with SimProgress(console, spec.rounds) as progress:
        result = run_simulation(
            spec,
            sites,
            workdir,
            on_progress=progress.update,
            engine=engine,
            sites_per_actor=sites_per_actor,
            on_start=started,
        )
    exp = result.experiment
    console.print(metrics_table(result.metrics, last_round_only=True))
    console.print(f"experiment {exp.status} after {exp.rounds_done} rounds in {result.wall_time_s:.1f} s")
    if exp.error:
        console.print(f"[red]{exp.error}[/]")
    if result.model_dir is not None:  # nnU-Net: a results folder its own tools load
        console.print(
            f"nnU-Net model → {result.model_dir}\n"
            f"  nnU-Net:  nnUNetv2_predict_from_modelfolder -i IN_DIR -o OUT_DIR -m {result.model_dir} -f all\n"
            f"  Laulima:  laulima predict --model {result.model_dir} --input SCAN.nii.gz --output OUT.nii.gz"
        )
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "experiment": exp.model_dump(mode="json"),
            "metrics": [m.model_dump(mode="json") for m in result.metrics],
            "wall_time_s": result.wall_time_s,
        }
        json_out.write_text(json.dumps(payload, indent=2))
        console.print(f"result → {json_out}")
    if exp.status != "completed":
        raise typer.Exit(1)


def main() -> None:
    """Entry point: run the app, mapping Laulima errors to messages and exit codes."""
    try:
        app()
    except LaulimaError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
