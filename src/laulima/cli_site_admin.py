"""The site administrator's commands, and the audit trails' commands of site and hub.

Mounted by :mod:`laulima.cli`::

    laulima site policy show|check --home HOME        the effective policy; check it parses
    laulima site jobs [--all] --home HOME             jobs waiting for (or given) a decision
    laulima site jobs show JOB [--source] --home HOME a job, its manifest and its source
    laulima site approve JOB [--reason] [--by]        let a held job run, and audit it
    laulima site reject JOB --reason TEXT [--by]      refuse it (the reason reaches the scientist)
    laulima site audit show|verify|reanchor --home HOME
    laulima site privacy --home HOME                  each dataset's privacy budget, spent, left
    laulima site ui [--port 8790] --home HOME         the site dashboard, on 127.0.0.1 only
    laulima site ui-token add|revoke|list --home HOME who may sign in to the dashboard
    laulima hub-audit show|verify|reanchor --home HUB_HOME   the hub's own record (operator)

Approvals are the decisions a hospital must be able to account for, so ``approve`` and
``reject`` check first that the site's audit log can be written and refuse to decide when it
cannot; the entry (who, why, what scope, which job, experiment and bundle digest) is appended
right after the decision. Everything shown comes from the hub or from a scientist's bundle:
it is printed without markup and with control characters made visible, so nothing received
can restyle or rewrite the administrator's terminal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from laulima.cli_algorithm import print_sources, terminal_safe
from laulima.errors import ConfigurationError

if TYPE_CHECKING:
    from laulima.auditlog import HashChainLog
    from laulima.site.approvals import ApprovalStore, PendingJob
    from laulima.site.policy import SitePolicy
    from laulima.site.review import Verb

__all__ = [
    "hub_audit_app",
    "jobs_app",
    "policy_app",
    "site_approve",
    "site_audit_app",
    "site_privacy",
    "site_reject",
    "site_ui",
    "ui_token_app",
]

console = Console(soft_wrap=True, highlight=False, emoji=False)
err_console = Console(stderr=True, soft_wrap=True, highlight=False, emoji=False)

policy_app = typer.Typer(help="The site's policy: what may run on its data, and when to ask.", no_args_is_help=True)
jobs_app = typer.Typer(
    help="Jobs waiting for an administrator's decision (`show JOB` for one job).", invoke_without_command=True
)
site_audit_app = typer.Typer(help="The site's audit log: what ran, who allowed it, what left.", no_args_is_help=True)
ui_token_app = typer.Typer(
    help="Who may sign in to the site dashboard: one named token per administrator.", no_args_is_help=True
)
hub_audit_app = typer.Typer(
    help="The hub's own audit record: who submitted, shared, downloaded what (operator, on the hub machine).",
    no_args_is_help=True,
)

Home = Annotated[Path, typer.Option("--home", help="The site's home folder.")]
By = Annotated[str | None, typer.Option("--by", help="Who decides, as recorded (default: the OS user running this).")]


# -- policy ------------------------------------------------------------------------------
@policy_app.command("show")
def policy_show(home: Home) -> None:
    """Print the policy in force (the file's, or the defaults when there is none) as TOML."""
    from laulima.site.policy import POLICY_FILE, load_policy

    path = home / POLICY_FILE
    policy = load_policy(home)
    if path.exists():
        header = f"# the policy in force, read from {path}"
    else:
        header = f"# {path} does not exist: these defaults apply. `laulima site init` writes a commented file to edit."
    console.print(terminal_safe(header), markup=False)
    console.print("\n".join(policy_toml(policy)), markup=False)


@policy_app.command("check")
def policy_check(home: Home) -> None:
    """Load the policy as the agent will; one line saying what it does, or the error naming the field."""
    from laulima.site.policy import POLICY_FILE, load_policy

    path = home / POLICY_FILE
    policy = load_policy(home)  # a broken file raises ConfigurationError: exit 2 naming the field
    where = f"({path})" if path.exists() else f"(no {path}: the defaults)"
    console.print(f"policy OK: {policy_summary(policy)} {terminal_safe(where)}", markup=False)


def policy_summary(policy: SitePolicy) -> str:
    """The policy in one line: every rule that changes what runs without asking."""
    algorithms, datasets, sandbox = policy.algorithms, policy.datasets, policy.sandbox
    signers = ", ".join(s.name for s in algorithms.signers) or "none"
    caps = [
        f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
        for name, value in (
            ("max_rounds", policy.max_rounds),
            ("max_task_seconds", policy.max_task_seconds),
            ("max_memory_mb", policy.max_memory_mb),
            ("max_cpu_seconds", policy.max_cpu_seconds),
        )
        if value is not None
    ]
    parts = [
        f"approval={policy.approval}",
        f"approval_scope={policy.approval_scope}",
        f"evaluation_auto={str(policy.evaluation_auto).lower()}",
        f"min_cohort={policy.min_cohort}",
        f"builtin={str(algorithms.builtin).lower()}",
        f"digests={len(algorithms.digests)}",
        f"signers={signers}",
        f"datasets={','.join(datasets.allowed) or 'none'}",
        f"dataset rules={len(datasets.experiments)}",
        f"network={str(sandbox.network).lower()}",
        f"on_unsupported={sandbox.on_unsupported}",
        f"caps: {', '.join(caps) or 'none'}",
        f"privacy: {privacy_summary(policy)}",
    ]
    return ", ".join(parts)


def privacy_summary(policy: SitePolicy) -> str:
    """The ``[privacy]`` rules in a few words."""
    rules = policy.privacy
    budget = (
        f"max_epsilon={rules.max_epsilon:g} at delta={rules.delta:g}" if rules.max_epsilon is not None else "no budget"
    )
    parts = [budget, f"min_noise_multiplier={rules.min_noise_multiplier:g}", f"require={str(rules.require).lower()}"]
    if rules.max_clip is not None:
        parts.append(f"max_clip={rules.max_clip:g}")
    return " ".join(parts)


def policy_toml(policy: SitePolicy) -> list[str]:
    """``policy`` as TOML lines that parse back to the same policy; unset limits as comments."""
    return _toml_table(policy.model_dump(mode="json"), "")


def _toml_table(data: dict[str, Any], name: str) -> list[str]:
    lines: list[str] = []
    for key, value in data.items():
        if value is None:
            lines.append(f"# {key} is unset (no limit)")
        elif not isinstance(value, dict) and not _table_list(value):
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in data.items():
        full = f"{name}.{key}" if name else key
        if isinstance(value, dict):
            lines += ["", f"[{full}]", *_toml_table(value, full)]
        elif _table_list(value):
            for item in value:
                lines += ["", f"[[{full}]]", *_toml_table(item, full)]
    return lines


def _table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes are TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")  # pragma: no cover - a policy holds none


# -- jobs --------------------------------------------------------------------------------
@jobs_app.callback()
def site_jobs(
    ctx: typer.Context,
    home: Annotated[Path | None, typer.Option("--home", help="The site's home folder.")] = None,
    all_jobs: Annotated[bool, typer.Option("--all", help="Also the jobs already approved or rejected.")] = False,
    limit: Annotated[int, typer.Option(help="With --all: the most recent jobs to list.", min=1)] = 100,
) -> None:
    """List the jobs waiting for a decision (with --all, the decided ones too)."""
    ctx.obj = home
    if ctx.invoked_subcommand is not None:
        return
    store = _store(_need_home(home))
    if store is None:
        jobs = []
    else:
        jobs = store.jobs(limit=limit) if all_jobs else store.pending()
    if not jobs:
        console.print("no jobs recorded" if all_jobs else "no jobs waiting for a decision", markup=False)
        return
    table = Table(
        "job",
        "experiment",
        "requester",
        "algorithm",
        "digest",
        "signer",
        "dataset",
        "rounds",
        "kind",
        "received",
        "status",
    )
    for job in jobs:
        table.add_row(
            *(
                Text(terminal_safe(cell))
                for cell in (
                    str(job.id),
                    f"{job.experiment_id} {job.experiment_name}",
                    job.requester,
                    job.algorithm_name,
                    job.digest[:12] if job.digest else "built-in",
                    job.signer or "-",
                    job.dataset,
                    str(job.rounds),
                    job.kind,
                    _when(job.received_at),
                    job.status,
                )
            )
        )
    console.print(table)
    if not all_jobs:
        console.print(
            "review with `laulima site jobs show JOB --source`, then `laulima site approve JOB` or "
            "`laulima site reject JOB --reason TEXT`",
            markup=False,
        )


@jobs_app.command("show")
def site_jobs_show(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job number `laulima site jobs` lists.")],
    home: Annotated[Path | None, typer.Option("--home", help="The site's home folder.")] = None,
    source: Annotated[bool, typer.Option("--source", help="Also print every source file of the bundle.")] = False,
) -> None:
    """One job: what it asks, its decision, its manifest; with --source the code itself."""
    site_home = _need_home(home if home is not None else ctx.obj)
    store = _store(site_home, job_id)
    assert store is not None
    job = store.get(job_id)
    for line in job_lines(job):
        console.print(terminal_safe(line), markup=False)
    if not source:
        return
    from laulima.site.review import bundle_sources

    sources = bundle_sources(site_home, job)  # verified against the digest under review
    if sources is None:
        console.print(
            f"\n{terminal_safe(job.entry_point)} is a built-in algorithm: its source is Laulima's own", markup=False
        )
        return
    print_sources(sources)


def job_lines(job: PendingJob) -> list[str]:
    """What an administrator decides on, one fact per line."""
    from laulima.site.review import job_facts

    lines = [f"job {job.id}  {job.status}", *(f"  {label:<13} {text}" for label, text in job_facts(job))]
    manifest = job.manifest
    requirements = manifest.get("requirements") or []
    files = manifest.get("files") or {}
    if manifest:
        lines.append("manifest")
        lines.append(f"  requirements  {', '.join(map(str, requirements)) or '(none)'}")
        lines.append(f"  files         {len(files)}")
        if isinstance(files, dict):
            lines += [f"    {sha}  {path}" for path, sha in sorted(files.items())]
    return lines


def site_approve(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job number `laulima site jobs` lists.")],
    home: Home,
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded in the audit log).")] = "",
    by: By = None,
) -> None:
    """Let job JOB run (for its experiment, or its round under approval_scope = "round"); audited."""
    _decide(home, job_id, "approve", reason, by)


def site_reject(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job number `laulima site jobs` lists.")],
    home: Home,
    reason: Annotated[str, typer.Option("--reason", help="Why; the data scientist is shown it.")],
    by: By = None,
) -> None:
    """Refuse job JOB; the reason is recorded and sent to the hub; audited."""
    _decide(home, job_id, "reject", reason, by)


def _decide(home: Path, job_id: str, verb: Verb, reason: str, by: str | None) -> None:
    from laulima.site.review import decide_job

    decided = decide_job(home, job_id, verb, reason, by)
    console.print(terminal_safe(decided.summary()), markup=False)


# -- audit -------------------------------------------------------------------------------
@site_audit_app.command("show")
def site_audit_show(
    home: Home,
    experiment: Annotated[int | None, typer.Option(help="Only this experiment's entries.", min=0)] = None,
    limit: Annotated[int | None, typer.Option(help="Only the most recent N entries.", min=1)] = None,
) -> None:
    """Print the site's audit log, one entry a line."""
    from laulima.site.audit import AuditLog

    show_audit(AuditLog(home), experiment, limit)


@site_audit_app.command("verify")
def site_audit_verify(home: Home) -> None:
    """Check the hash chain and its head; exit 1 naming the first bad line if the log was damaged."""
    from laulima.site.audit import AuditLog

    verify_audit(AuditLog(home))


@site_audit_app.command("reanchor")
def site_audit_reanchor(
    home: Home, reason: Annotated[str, typer.Option("--reason", help="Why the head may be reset (recorded).")]
) -> None:
    """Accept the log's end as its head (after a restore, a deleted head); recorded in the log itself."""
    from laulima.site.audit import AuditLog

    reanchor_audit(AuditLog(home), reason)


HubHome = Annotated[
    Path,
    typer.Option(
        "--home",
        help="The hub's home folder (or its audit_dir, if set apart).",
        envvar=["LAULIMA_HUB_AUDIT_DIR", "LAULIMA_HUB_HOME"],
    ),
]


@hub_audit_app.command("show")
def hub_audit_show(
    home: HubHome = Path(".laulima/hub"),
    experiment: Annotated[int | None, typer.Option(help="Only this experiment's entries.", min=0)] = None,
    limit: Annotated[int | None, typer.Option(help="Only the most recent N entries.", min=1)] = None,
) -> None:
    """Print the hub's audit record, one entry a line (GET /api/v1/audit gives it over the API)."""
    show_audit(_hub_log(home), experiment, limit)


@hub_audit_app.command("verify")
def hub_audit_verify(home: HubHome = Path(".laulima/hub")) -> None:
    """Check the hub's record; exit 1 naming the first bad line if it was damaged."""
    verify_audit(_hub_log(home))


@hub_audit_app.command("reanchor")
def hub_audit_reanchor(
    reason: Annotated[str, typer.Option("--reason", help="Why the head may be reset (recorded).")],
    home: HubHome = Path(".laulima/hub"),
) -> None:
    """Accept the record's end as its head, so the hub records (and grants) again; recorded itself."""
    reanchor_audit(_hub_log(home), reason)


def _hub_log(home: Path) -> HashChainLog:
    from laulima.hub.audit import HubAuditLog

    if not home.is_dir():
        raise ConfigurationError(
            f"--home {home}: no such folder; give the hub's home (`laulima hub --home`) or its audit_dir",
            field="home",
        )
    return HubAuditLog(home)


def show_audit(log: HashChainLog, experiment: int | None, limit: int | None) -> None:
    """Print ``log``'s entries (of ``experiment``; the last ``limit``), control characters escaped."""
    from laulima.auditlog import format_entries

    entries = log.entries(experiment=experiment)
    if limit is not None:
        entries = entries[-limit:]
    if not entries:
        which = f" of experiment {experiment}" if experiment is not None else ""
        console.print(terminal_safe(f"no audit entries{which} in {log.path}"), markup=False)
        return
    for line in format_entries(entries):
        console.print(terminal_safe(line), markup=False)


def verify_audit(log: HashChainLog) -> None:
    """Print the verification report; exit 1 when the log is damaged."""
    from laulima.auditlog import format_verify

    result = log.verify()
    report = format_verify(result)
    if result.ok:
        console.print(terminal_safe(f"{log.path}: ") + report, markup=False)
        return
    first, _, rest = report.partition("\n")
    err_console.print(f"[bold red]error:[/] {terminal_safe(f'{log.path}: {first}')}")
    console.print(rest, markup=False)
    raise typer.Exit(1)


def reanchor_audit(log: HashChainLog, reason: str) -> None:
    entry = log.reanchor(reason)
    console.print(
        terminal_safe(f"{log.path}: head reset at entry #{entry.seq} ({entry.event}); the reset itself is in the log"),
        markup=False,
    )


# -- privacy -----------------------------------------------------------------------------
def site_privacy(home: Home) -> None:
    """Each dataset's privacy budget, what it has spent and has left, and every experiment's reservation.

    Every ε is at the policy's δ (``[privacy] delta``), composed by the accountant over all
    of a dataset's experiments: a dataset's spent ε is not the sum of its experiments' ε.
    """
    from laulima.site.policy import POLICY_FILE, load_policy
    from laulima.site.privacy_ledger import PRIVACY_FILE, PrivacyLedger, format_epsilon

    if not home.is_dir():
        raise ConfigurationError(
            f"--home {home}: no such folder; give the site's home (`laulima site init --home`)", field="home"
        )
    rules = load_policy(home).privacy
    if rules.max_epsilon is not None:
        console.print(
            f"privacy budget: ε = {rules.max_epsilon:.2f} per dataset at δ = {rules.delta:g} "
            f"([privacy] max_epsilon in {terminal_safe(str(home / POLICY_FILE))})",
            markup=False,
        )
    else:
        console.print(
            f"no privacy budget ([privacy] max_epsilon is unset): spending is recorded, nothing is refused for it; "
            f"ε below at δ = {rules.delta:g}",
            markup=False,
        )
    if not (home / PRIVACY_FILE).exists():
        console.print("no privacy spent: no training task with differential privacy has run here", markup=False)
        return
    ledger = PrivacyLedger(home)
    reservations = ledger.reservations()
    if not reservations:
        console.print("no privacy spent: no training task with differential privacy has run here", markup=False)
        return
    budget = format_epsilon(rules.max_epsilon) if rules.max_epsilon is not None else "none"
    datasets = Table("dataset", "budget ε", "spent ε", "left ε", "experiments")
    for name in ledger.datasets():
        left = ledger.left(name, rules)
        datasets.add_row(
            Text(terminal_safe(name)),
            budget,
            format_epsilon(ledger.spent(name, rules)),
            format_epsilon(left) if rules.max_epsilon is not None else "-",
            str(sum(r.dataset == name for r in reservations)),
        )
    console.print(datasets)
    experiments = Table(
        "dataset", "experiment", "noise multiplier", "clip", "δ", "rounds run / reserved", "ε so far", "ε reserved"
    )
    for r in reservations:
        experiments.add_row(
            Text(terminal_safe(r.dataset)),
            Text(terminal_safe(f"{r.experiment_id} {r.experiment_name}")),
            f"{r.noise_multiplier:g}",
            f"{r.clip:g}",
            f"{r.delta:g}",
            f"{r.rounds_run} / {r.reserved}",
            format_epsilon(r.epsilon_so_far(rules.delta)),
            format_epsilon(r.epsilon(rules.delta)),
        )
    console.print(experiments)


# -- the dashboard -----------------------------------------------------------------------
def site_ui(
    home: Home,
    port: Annotated[int, typer.Option(help="The port to listen on.", min=1, max=65535)] = 8790,
    host: Annotated[str, typer.Option(help="A loopback address: the dashboard never listens beyond this machine.")] = (
        "127.0.0.1"
    ),
) -> None:
    """Serve the site dashboard on this machine only: pending jobs, approve / reject, datasets, budget, audit.

    At its first start it makes a dashboard token for you (the OS user) and prints it once.
    From another machine, reach it through an SSH tunnel (ssh -L 8790:127.0.0.1:8790 HOST).
    """
    from laulima.site.ui.server import serve

    serve(home, host=host, port=port, say=lambda text: console.print(text, markup=False))


@ui_token_app.command("add")
def ui_token_add(
    name: Annotated[str, typer.Argument(help="Who the token is for: decisions are recorded under this name.")],
    home: Home,
) -> None:
    """Make a dashboard token for NAME and print it once (it is stored hashed)."""
    from laulima.site.ui.tokens import DashboardTokens

    tokens = DashboardTokens(_need_site(home))
    token = tokens.add(name)
    console.print(f"dashboard token for {terminal_safe(name)} (shown once; keep it like a password):", markup=False)
    console.print(f"    {token}", markup=False)


@ui_token_app.command("revoke")
def ui_token_revoke(
    name: Annotated[str, typer.Argument(help="Whose token to revoke.")],
    home: Home,
) -> None:
    """Revoke NAME's dashboard token; their open sessions end at their next request."""
    from laulima.site.ui.tokens import DashboardTokens

    if not DashboardTokens(_need_site(home)).revoke(name):
        raise ConfigurationError(f"{name!r:.80} has no dashboard token (`laulima site ui-token list`)", field="name")
    console.print(f"dashboard token of {terminal_safe(name)} revoked; their sessions end now", markup=False)


@ui_token_app.command("list")
def ui_token_list(home: Home) -> None:
    """Who holds a dashboard token, and since when (the tokens themselves are not stored)."""
    from laulima.site.ui.tokens import DashboardTokens

    tokens = DashboardTokens(_need_site(home)).tokens()
    if not tokens:
        console.print("no dashboard tokens", markup=False)
        return
    for token in tokens:
        console.print(f"{terminal_safe(token.name)}  since {_when(token.created_at)}", markup=False)


def _need_site(home: Path) -> Path:
    if not home.is_dir():
        raise ConfigurationError(
            f"--home {home}: no such folder; give the site's home (`laulima site init --home`)", field="home"
        )
    return home


# -- helpers -----------------------------------------------------------------------------
def _store(home: Path, job_id: str | None = None) -> ApprovalStore | None:
    """The site's approvals store; None when no job ever waited (nothing is created then).

    Given ``job_id``, a missing store is that job being unknown (exit 2).
    """
    from laulima.site.review import approvals_store

    return approvals_store(home, job_id)


def _need_home(home: Path | None) -> Path:
    if home is None:
        raise ConfigurationError("--home is needed: the site's home folder (as for `laulima site run`)", field="home")
    return home


def _when(timestamp: float | None) -> str:
    from laulima.site.review import when

    return when(timestamp)
