"""The ``laulima`` command: hub, site agent, experiments, and the local simulation."""

from __future__ import annotations

import json
import logging
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

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
err_console = Console(stderr=True)

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


def _fail(exc: LaulimaError) -> NoReturn:
    code = next(c for cls, c in EXIT_CODES if isinstance(exc, cls))
    err_console.print(f"[bold red]error:[/] {exc}")
    sys.exit(code)


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# -- hub ------------------------------------------------------------------------
@app.command()
def hub(
    home: Annotated[Path, typer.Option(help="Folder for the hub's database and blobs.")] = Path(".laulima/hub"),
    host: Annotated[str, typer.Option(help="Address to bind (plain HTTP only on loopback).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8780,
) -> None:
    """Run the federation hub."""
    from laulima.hub.server import serve
    from laulima.hub.settings import HubSettings

    _logging(False)
    serve(HubSettings(home=home, host=host, port=port))


# -- site -----------------------------------------------------------------------
@site_app.command("register")
def site_register(name: str, hub_url: HubUrl, token: Token) -> None:
    """(Operator) create a site at the hub and print its token, shown only once."""
    from laulima.client import Client

    with Client(hub_url, token) as client:
        created = client.register_site(name)
    console.print(f"site [bold]{created.name}[/] registered; its token (shown once):")
    print(created.token)


@site_app.command("init")
def site_init(
    home: Annotated[Path, typer.Option(help="The site's home folder.")],
    name: Annotated[str, typer.Option(help="The site's name at the hub.")],
    hub_url: HubUrl,
    site_token: Annotated[str, typer.Option("--site-token", envvar="LAULIMA_SITE_TOKEN")],
) -> None:
    """(Site admin) write the agent's configuration into HOME."""
    from laulima.site.settings import write_site_config

    write_site_config(home, name=name, hub_url=hub_url, token=site_token)
    console.print(f"site [bold]{name}[/] configured in {home}; register data with `laulima site dataset add`")


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
    path: Path,
    home: Annotated[Path, typer.Option(help="The site's home folder.")],
) -> None:
    """Register a local dataset folder under NAME."""
    from laulima.site.catalog import Catalog

    Catalog(home).add(name, path)
    console.print(f"dataset [bold]{name}[/] → {path.resolve()}")


@dataset_app.command("list")
def dataset_list(home: Annotated[Path, typer.Option(help="The site's home folder.")]) -> None:
    """List the registered datasets."""
    from laulima.site.catalog import Catalog

    for name, path in Catalog(home).list().items():
        console.print(f"{name}\t{path}")


# -- experiments ----------------------------------------------------------------
@experiment_app.command("submit")
def experiment_submit(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC")], hub_url: HubUrl, token: Token
) -> None:
    """Validate SPEC, build the initial model, and submit the experiment."""
    from laulima.client import Client
    from laulima.core.spec import load_spec
    from laulima.sim import initial_weights_bytes

    spec = load_spec(spec_path)
    with Client(hub_url, token) as client:
        exp = client.submit(spec.model_dump(mode="json"), initial_weights_bytes(spec))
    console.print(f"experiment [bold]{exp.id}[/] ({exp.name}) submitted: {exp.rounds} rounds")


@experiment_app.command("list")
def experiment_list(hub_url: HubUrl, token: Token) -> None:
    """List experiments."""
    from laulima.client import Client

    with Client(hub_url, token) as client:
        exps = client.experiments()
    table = Table("id", "name", "status", "rounds", "error")
    for e in exps:
        table.add_row(str(e.id), e.name, e.status, f"{e.rounds_done}/{e.rounds}", e.error or "")
    console.print(table)


@experiment_app.command("status")
def experiment_status(experiment_id: int, hub_url: HubUrl, token: Token) -> None:
    """Show one experiment: rounds, per-site metrics, refused updates."""
    from laulima.client import Client
    from laulima.reporting import metrics_table

    with Client(hub_url, token) as client:
        exp = client.experiment(experiment_id)
        rounds = client.rounds(experiment_id)
        metrics = client.metrics(experiment_id)
        refusals = client.refusals(experiment_id)
    console.print(f"[bold]{exp.name}[/] (#{exp.id}) {exp.status}, round {exp.rounds_done}/{exp.rounds}")
    if exp.error:
        console.print(f"[red]{exp.error}[/]")
    table = Table("round", "status", "sites", "updates")
    for r in rounds:
        table.add_row(str(r.index), r.status, ", ".join(r.sites), str(r.n_updates))
    console.print(table)
    console.print(metrics_table(metrics))
    for ref in refusals:
        console.print(f"[yellow]refused[/] {ref.site} task {ref.task_id}: {ref.status} {ref.reason}")


@experiment_app.command("cancel")
def experiment_cancel(experiment_id: int, hub_url: HubUrl, token: Token) -> None:
    """Cancel a running experiment; its open tasks are withdrawn."""
    from laulima.client import Client

    with Client(hub_url, token) as client:
        exp = client.cancel(experiment_id)
    console.print(f"experiment {exp.id} is {exp.status}")


@experiment_app.command("model")
def experiment_model(
    experiment_id: int,
    hub_url: HubUrl,
    token: Token,
    output: Annotated[Path, typer.Option(help="Where to write the safetensors file.")] = Path("model.safetensors"),
) -> None:
    """Download the newest global model."""
    from laulima.client import Client

    with Client(hub_url, token) as client:
        client.download_model(experiment_id, output)
    console.print(f"global model of experiment {experiment_id} → {output}")


# -- simulation -------------------------------------------------------------------
@app.command()
def sim(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="Experiment spec (TOML).")],
    sites: Annotated[int, typer.Option("--sites", help="Number of site agents.")] = 3,
    workdir: Annotated[Path, typer.Option(help="Where hub, sites and data live.")] = Path("laulima-sim"),
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the result as JSON.")] = None,
) -> None:
    """Run SPEC on a local federation: a hub and N site agents as separate processes."""
    from laulima.core.spec import load_spec

    _run_sim(load_spec(spec_path), sites, workdir, json_out)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where hub, sites and data live.")] = Path("laulima-demo"),
    sites: Annotated[int, typer.Option("--sites")] = 3,
) -> None:
    """The demonstration: a whole federation on this machine, one command."""
    from laulima.core.spec import load_spec

    spec_file = resources.files("laulima.examples").joinpath("tiny.toml")
    with resources.as_file(spec_file) as path:
        spec = load_spec(path)
    _run_sim(spec, sites, workdir, workdir / "result.json")


def _run_sim(spec: object, sites: int, workdir: Path, json_out: Path | None) -> None:
    from laulima.core.spec import ExperimentSpec
    from laulima.reporting import SimProgress, metrics_table
    from laulima.sim import run_simulation

    assert isinstance(spec, ExperimentSpec)
    console.print(
        f"[bold]{spec.name}[/]: {spec.rounds} rounds of {spec.strategy.name} on {sites} sites "
        f"(hub and agents as separate processes on loopback; logs in {workdir})"
    )
    with SimProgress(console, spec.rounds) as progress:
        result = run_simulation(spec, sites, workdir, on_progress=progress.update)
    exp = result.experiment
    console.print(metrics_table(result.metrics, last_round_only=True))
    console.print(f"experiment {exp.status} after {exp.rounds_done} rounds in {result.wall_time_s:.1f} s")
    if exp.error:
        console.print(f"[red]{exp.error}[/]")
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
