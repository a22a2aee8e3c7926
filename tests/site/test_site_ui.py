"""The site dashboard (``laulima site ui``) over a real site home, through FastAPI's TestClient.

The home holds what a running site holds: a catalog with a registered dataset, a privacy
ledger with an experiment's reservation (made by the real gate under an automatic policy),
a job held by the real gate under ``approval = "manual"`` (its bundle kept where the agent
keeps it), and the audit trail the agent writes. The tests sign in as a browser does, then
check that nothing shows without signing in, that decisions need the session's CSRF token
and this page's origin, that a decision is recorded exactly as ``laulima site approve`` records
it, and that the numbers shown are the stores' own.
"""

from __future__ import annotations

import json
import logging
import os
import re
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from laulima.algorithms.bundle import PackedBundle, pack
from laulima.cli import app as cli_app
from laulima.core.privacy.messages import TaskPrivacy
from laulima.core.protocol import TaskPublic
from laulima.site.approvals import ApprovalStore
from laulima.site.audit import AUDIT_FILE, AuditEvent, AuditLog, canonical_json
from laulima.site.catalog import Catalog
from laulima.site.client import HubClient
from laulima.site.gate import Admitted, Gate, Held, bundle_archive
from laulima.site.policy import Verdict, load_policy
from laulima.site.privacy_ledger import PrivacyLedger, format_epsilon
from laulima.site.ui import views
from laulima.site.ui.app import COOKIE, create_app
from laulima.site.ui.tokens import TOKENS_FILE, DashboardTokens

IDENTITY = "laulima.algorithms.identity:Identity"
BASE = "https://127.0.0.1"
ADMIN = "dr.kealoha"
MakeTask = Callable[..., TaskPublic]

SCIENTIST_CODE = '''"""A scientist's algorithm, as it reaches the site."""
import numpy as np
from laulima import Algorithm, Evaluation, Update

BANNER = "<script>alert('owned')</script>"  # must reach the administrator as text\u202e


class Probe(Algorithm):
    def initial_weights(self, params, seed):
        return {"w": np.zeros(2, dtype=np.float32)}

    def train(self, weights, config):
        return Update(weights, n_samples=1, metrics={})

    def evaluate(self, weights):
        return Evaluation(n_samples=1, metrics={})
'''


@dataclass
class Site:
    home: Path
    bundle: PackedBundle
    job_id: int
    gate: Gate
    make_task: MakeTask


def write_policy(home: Path, text: str) -> None:
    path = home / "policy.toml"
    path.write_text(text)
    path.chmod(0o600)


def hold(site_gate: Gate, home: Path, task: TaskPublic) -> Held:
    """What the agent does with a task: ask the gate, and audit the hold as ``_hold`` does."""
    held = site_gate.admit(task)
    assert isinstance(held, Held), held
    AuditLog(home).append(
        AuditEvent.DECIDED,
        task=task.id,
        experiment=task.experiment_id,
        decision="hold",
        reason=held.why,
        job=held.job_id,
    )
    return held


@pytest.fixture
def site(tmp_path: Path, make_task: MakeTask) -> Site:
    home = tmp_path / "site"
    data = tmp_path / "brain"
    data.mkdir()
    (data / "train.csv").write_text("x0,label\n0.1,0\n0.2,1\n0.3,0\n")
    Catalog(home).add("brain", data)
    site_gate = Gate(home, Catalog(home), cast(HubClient, object()), ApprovalStore(home), audit=AuditLog(home))

    # An earlier experiment with differential privacy ran under an automatic policy: the gate reserved it.
    write_policy(home, "[privacy]\nmax_epsilon = 8.0\n")
    dp = TaskPrivacy(mode="local", clip=1.0, noise_multiplier=1.5, delta=1e-5)
    earlier = make_task(
        id="e-1", experiment_id=1, experiment_name="warm-up", algorithm=IDENTITY, dataset="brain", rounds=5, privacy=dp
    )
    assert isinstance(site_gate.admit(earlier), Admitted)

    # Now the administrator reviews every experiment: the scientist's bundle waits.
    write_policy(home, 'approval = "manual"\n\n[privacy]\nmax_epsilon = 8.0\n')
    package = tmp_path / "scientist" / "probe"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""Probe."""\n')
    (package / "model.py").write_text(SCIENTIST_CODE)
    bundle = pack(package, "probe.model:Probe", requirements=["numpy>=1.26"])
    bundle_archive(home, bundle.digest).parent.mkdir(mode=0o700, exist_ok=True)
    bundle.save(bundle_archive(home, bundle.digest))  # as the agent keeps it (no hub to download from here)
    task = make_task(
        id="t-42",
        experiment_id=7,
        experiment_name="brats-7",
        requester="alice",
        algorithm="probe.model:Probe",
        bundle_digest=bundle.digest,
        bundle_size=len(bundle.data),
        dataset="brain",
        rounds=3,
        round=0,
    )
    held = hold(site_gate, home, task)
    DashboardTokens(home)  # no file yet: tokens are made per test
    return Site(home, bundle, held.job_id, site_gate, make_task)


@pytest.fixture
def token(site: Site) -> str:
    return DashboardTokens(site.home).add(ADMIN)


@pytest.fixture
def client(site: Site) -> Iterator[TestClient]:
    with TestClient(create_app(site.home), base_url=BASE, follow_redirects=False) as http:
        yield http


def sign_in(http: TestClient, token: str, next_url: str = "/") -> str:
    """Sign in through the form as a browser does; returns the session's CSRF token."""
    form = http.get("/login", params={"next": next_url})
    assert form.status_code == 200
    login_csrf = _field(form.text, "csrf_token")
    signed = http.post("/login", data={"csrf_token": login_csrf, "token": token, "next": next_url})
    assert signed.status_code == 303, signed.text
    page = http.get(next_url)
    assert page.status_code == 200, page.text
    return _field(page.text, "csrf_token")


def _field(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, f"no {name} field in the page"
    return match.group(1)


def decide(http: TestClient, job: int, verb: str, csrf: str | None, reason: str = "", **headers: str) -> Any:
    data = {"reason": reason} if csrf is None else {"csrf_token": csrf, "reason": reason}
    return http.post(f"/jobs/{job}/{verb}", data=data, headers=headers)


# -- signing in ------------------------------------------------------------------------------


def test_a_signed_out_visitor_gets_the_sign_in_page_or_a_401_and_no_job_data(site: Site, client: TestClient, token):
    for path in ("/", f"/jobs/{site.job_id}", "/audit"):
        answer = client.get(path)
        assert answer.status_code == 303 and answer.headers["location"].startswith("/login?next="), path
    login = client.get(client.get(f"/jobs/{site.job_id}").headers["location"])
    assert login.status_code == 200 and 'name="token"' in login.text and 'type="password"' in login.text
    fragment = client.get("/fragments/pending")
    assert fragment.status_code == 401 and fragment.headers["content-type"].startswith("text/plain")
    posted = client.post(f"/jobs/{site.job_id}/approve", data={"reason": "x"})
    assert posted.status_code == 401
    for answer in (login, fragment, posted):
        assert (
            "brats-7" not in answer.text and "alice" not in answer.text and site.bundle.digest[:12] not in answer.text
        )
    assert ApprovalStore(site.home).get(site.job_id).status == "pending"

    login_csrf = _field(client.get("/login").text, "csrf_token")
    wrong = client.post("/login", data={"csrf_token": login_csrf, "token": "not-a-token", "next": "/"})
    assert wrong.status_code == 401 and COOKIE not in wrong.headers.get("set-cookie", "")
    assert client.get("/static/laulima.css").status_code == 200  # the sign-in page's own stylesheet
    assert client.get("/", headers={"host": "rebound.example"}).status_code == 400  # DNS rebinding


def test_signing_in_sets_an_httponly_secure_samesite_cookie_and_the_overview_lists_the_held_job(
    site: Site, client: TestClient, token: str
):
    login_csrf = _field(client.get("/login").text, "csrf_token")
    signed = client.post("/login", data={"csrf_token": login_csrf, "token": token, "next": "/"})
    assert signed.status_code == 303 and signed.headers["location"] == "/"
    cookie = next(c for c in signed.headers.get_list("set-cookie") if c.startswith(f"{COOKIE}="))
    assert {"httponly", "secure", "samesite=strict"} <= {part.strip().lower() for part in cookie.split(";")}
    assert token not in cookie
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-security-policy"].startswith("default-src 'none'")
    row = re.search(rf'<tr data-job="{site.job_id}">(.*?)</tr>', page.text, re.S)
    assert row, page.text
    for cell in ("7 brats-7", "alice", "probe", site.bundle.digest[:12], "brain", ">3<", "train"):
        assert cell in row.group(1), cell
    assert ADMIN in page.text and "site administrator" in page.text


def test_a_revoked_token_ends_its_session_at_the_next_request(site: Site, client: TestClient, token: str):
    sign_in(client, token)
    assert client.get("/fragments/pending").status_code == 200
    revoked = CliRunner().invoke(cli_app, ["site", "ui-token", "revoke", ADMIN, "--home", str(site.home)])
    assert revoked.exit_code == 0, revoked.output
    assert client.get("/fragments/pending").status_code == 401
    assert client.get("/").headers["location"] == "/login?next=/"
    login_csrf = _field(client.get("/login").text, "csrf_token")
    again = client.post("/login", data={"csrf_token": login_csrf, "token": token, "next": "/"})
    assert again.status_code == 401


# -- deciding --------------------------------------------------------------------------------


def test_a_decision_without_the_csrf_token_or_from_another_origin_is_refused_and_the_job_stays_pending(
    site: Site, client: TestClient, token: str
):
    csrf = sign_in(client, token)
    missing = decide(client, site.job_id, "approve", None, "ok")
    assert missing.status_code == 403 and "CSRF" in missing.text
    forged = decide(client, site.job_id, "approve", "not-the-token", "ok")
    assert forged.status_code == 403
    foreign = decide(client, site.job_id, "approve", csrf, "ok", origin="https://evil.example")
    assert foreign.status_code == 403 and "evil.example" in foreign.text
    referred = decide(client, site.job_id, "reject", csrf, "no", referer="http://127.0.0.1:9999/x")
    assert referred.status_code == 403
    assert ApprovalStore(site.home).get(site.job_id).status == "pending"
    assert [e.event for e in AuditLog(site.home).entries()][-1] == AuditEvent.DECIDED  # nothing recorded


def test_approving_records_the_reason_and_the_name_as_laulima_site_approve_does(
    site: Site, client: TestClient, token: str
):
    csrf = sign_in(client, token, f"/jobs/{site.job_id}")
    done = decide(client, site.job_id, "approve", csrf, "read   the code,\nit only echoes", origin=BASE)
    assert done.status_code == 303 and done.headers["location"] == f"/jobs/{site.job_id}"
    page = client.get(done.headers["location"])
    assert f"job {site.job_id} approved by {ADMIN}" in page.text and 'role="status"' in page.text
    assert "Approved by <strong>dr.kealoha</strong>" in page.text and 'id="approve-form"' not in page.text

    job = ApprovalStore(site.home).get(site.job_id)
    assert (job.status, job.decided_by, job.reason) == ("approved", ADMIN, "read the code, it only echoes")
    entry = AuditLog(site.home).entries()[-1]
    assert f"audit#{entry.seq}" in page.text
    assert entry.event == AuditEvent.APPROVED and (entry.task, entry.experiment) == ("t-42", 7)
    assert entry.fields == {
        "by": ADMIN,
        "reason": "read the code, it only echoes",
        "scope": "experiment",
        "round": None,
        "job": site.job_id,
        "experiment_name": "brats-7",
        "requester": "alice",
        "entry_point": "probe.model:Probe",
        "digest": site.bundle.digest,
        "signer": None,
        "dataset": "brain",
    }
    assert AuditLog(site.home).verify().ok
    decision = ApprovalStore(site.home).decision_for(7)  # what the agent reads back at its next poll
    assert decision is not None and decision.verdict is Verdict.RUN and ADMIN in decision.why

    twice = decide(client, site.job_id, "reject", csrf, "changed my mind")
    assert twice.status_code == 409 and f"already approved by {ADMIN}" in twice.text
    assert ApprovalStore(site.home).get(site.job_id).status == "approved"


def test_rejecting_needs_a_reason_and_then_refuses_the_experiment_with_it(site: Site, client: TestClient, token):
    csrf = sign_in(client, token)
    empty = decide(client, site.job_id, "reject", csrf, "   ")
    assert empty.status_code == 422
    assert 'id="reject-error"' in empty.text and "needs a reason" in empty.text and 'aria-invalid="true"' in empty.text
    assert ApprovalStore(site.home).get(site.job_id).status == "pending"
    assert AuditLog(site.home).entries()[-1].event == AuditEvent.DECIDED

    done = decide(client, site.job_id, "reject", csrf, "no external code this quarter")
    assert done.status_code == 303
    job = ApprovalStore(site.home).get(site.job_id)
    assert (job.status, job.decided_by) == ("rejected", ADMIN)
    assert AuditLog(site.home).entries()[-1].event == AuditEvent.REJECTED
    decision = ApprovalStore(site.home).decision_for(7)
    assert decision is not None and decision.verdict is Verdict.REFUSE and "this quarter" in decision.why


def test_unknown_jobs_are_404_pages_and_an_unwritable_audit_log_decides_nothing(site: Site, client, token):
    csrf = sign_in(client, token)
    for path in ("/jobs/999", "/jobs/abc"):
        answer = client.get(path)
        assert answer.status_code == 404 and "<h1>Not found</h1>" in answer.text, path
    assert decide(client, 999, "approve", csrf, "ok").status_code == 404
    (site.home / "audit.head").unlink()  # the log's end can no longer be checked: appends fail closed
    refused = decide(client, site.job_id, "approve", csrf, "ok")
    assert refused.status_code == 503 and "nothing was decided" in refused.text
    assert ApprovalStore(site.home).get(site.job_id).status == "pending"


# -- what the pages show ---------------------------------------------------------------------


def test_the_job_page_shows_the_manifest_and_the_source_as_text(
    site: Site, client: TestClient, token: str, monkeypatch: pytest.MonkeyPatch
):
    sign_in(client, token)
    page = client.get(f"/jobs/{site.job_id}").text
    assert "&lt;script&gt;alert(&#39;owned&#39;)&lt;/script&gt;" in page and "<script>alert" not in page
    assert "\\u202e" in page and "\u202e" not in page and "1 control character written out" in page
    assert "class Probe(Algorithm):" in page and "probe/model.py" in page
    for path, sha in site.bundle.manifest.files.items():
        assert path in page and sha in page
    assert "numpy&gt;=1.26" in page and site.bundle.digest in page
    assert "not a listed digest, and not signed by a signer the policy lists" in page
    assert "manual: every experiment waits for an administrator" in page
    assert 'id="approve-form"' in page and 'id="reject-reason" name="reason" required' in page
    assert '<span class="badge badge-decided">decided</span>' in page  # the experiment's audit entries: the hold

    monkeypatch.setattr(views, "MAX_FILE_CHARS", 100)
    cut = client.get(f"/jobs/{site.job_id}").text
    assert "Truncated: only the first 100 of" in cut and "class Probe" not in cut

    bundle_archive(site.home, site.bundle.digest).unlink()
    missing = client.get(f"/jobs/{site.job_id}")
    assert missing.status_code == 200 and "is missing, so its source cannot be shown" in missing.text


def test_the_audit_page_says_intact_then_broken_after_a_line_of_the_log_is_edited(site: Site, client, token):
    sign_in(client, token)
    page = client.get("/audit").text
    assert '<span class="badge badge-intact">intact</span>' in page
    entries = AuditLog(site.home).entries()
    seqs = [int(s) for s in re.findall(r'<tr data-seq="(\d+)">', page)]
    assert seqs == [e.seq for e in reversed(entries)]  # newest first
    assert "privacy_reserved" in page and "warm-up" in page
    only = client.get("/audit", params={"experiment": "7"}).text
    assert re.findall(r'<tr data-seq="(\d+)">', only) == [str(e.seq) for e in entries if e.experiment == 7][::-1]
    assert client.get("/audit", params={"experiment": "seven"}).status_code == 400

    lines = (site.home / AUDIT_FILE).read_bytes().splitlines(keepends=True)
    edited = json.loads(lines[0])
    edited["fields"]["dataset"] = "elsewhere"
    lines[0] = canonical_json(edited) + b"\n"
    (site.home / AUDIT_FILE).write_bytes(b"".join(lines))
    broken = client.get("/audit").text
    assert '<span class="badge badge-broken">broken</span>' in broken and "broken at line 1" in broken
    assert "broken at line 1" in client.get("/").text


def test_the_budget_shown_is_the_ledgers_and_says_when_there_is_none(site: Site, client: TestClient, token: str):
    sign_in(client, token)
    rules = load_policy(site.home).privacy
    ledger = PrivacyLedger(site.home)
    page = client.get("/").text
    row = re.search(
        r'<tr data-dataset="brain">\s*<th scope="row">brain</th>\s*<td class="num">8.00</td>(.*?)</tr>', page, re.S
    )
    assert row, page
    assert float(re.search(r'data-epsilon="([^"]+)"', row.group(1)).group(1)) == ledger.spent("brain", rules)
    assert float(re.search(r'data-left="([^"]+)"', row.group(1)).group(1)) == ledger.left("brain", rules)
    assert format_epsilon(ledger.spent("brain", rules)) in row.group(1)
    assert format_epsilon(ledger.left("brain", rules)) in row.group(1)
    assert "rounds 1 run / 5 reserved" in row.group(1)

    write_policy(site.home, 'approval = "manual"\n')
    plain = client.get("/").text
    assert "<strong>No budget set</strong>" in plain and "no budget set</td>" in plain


def test_the_pending_list_is_a_live_fragment_with_an_etag_and_a_new_job_changes_it(site: Site, client, token):
    sign_in(client, token)
    overview = client.get("/").text
    assert 'data-live="/fragments/pending"' in overview
    etag = re.search(r'data-etag="([^"]+)"', overview).group(1).replace("&#34;", '"')
    first = client.get("/fragments/pending")
    assert first.status_code == 200 and first.headers["etag"] == etag and "<html" not in first.text
    assert client.get("/fragments/pending", headers={"if-none-match": etag}).status_code == 304

    hold(
        site.gate,
        site.home,
        site.make_task(id="t-77", experiment_id=8, experiment_name="later", algorithm=IDENTITY, dataset="brain"),
    )
    fresh = client.get("/fragments/pending", headers={"if-none-match": etag})
    assert fresh.status_code == 200 and fresh.headers["etag"] != etag and "8 later" in fresh.text


def test_checking_a_datasets_files_reports_what_changed(site: Site, client: TestClient, token: str, tmp_path: Path):
    csrf = sign_in(client, token)
    checked = client.post("/datasets/brain/verify", data={"csrf_token": csrf})
    assert checked.status_code == 303
    assert "dataset brain: every file is as registered" in client.get("/").text
    assert client.post("/datasets/brain/verify", data={}).status_code == 403
    assert client.post("/datasets/nope/verify", data={"csrf_token": csrf}).status_code == 404
    (tmp_path / "brain" / "train.csv").unlink()
    (tmp_path / "brain").rmdir()
    assert '<span class="badge badge-failed">missing</span>' in client.get("/").text


def test_a_fresh_home_shows_empty_pages_and_creates_nothing_and_a_broken_policy_is_named(tmp_path: Path):
    home = tmp_path / "site"
    home.mkdir()
    token = DashboardTokens(home).add(ADMIN)
    with TestClient(create_app(home), base_url=BASE, follow_redirects=False) as http:
        sign_in(http, token)
        overview = http.get("/").text
        assert "No job waits for a decision." in overview and "No dataset is registered" in overview
        assert "<strong>No budget set</strong>" in overview and "0 entries, hash chain intact" in overview
        assert http.get("/audit").status_code == 200 and http.get("/jobs/1").status_code == 404
        assert sorted(p.name for p in home.iterdir()) == [".ui-tokens.lock", TOKENS_FILE]
        (home / "policy.toml").write_text("approval = 'sometimes'\n")
        (home / "policy.toml").chmod(0o600)
        broken = http.get("/")
        assert (
            broken.status_code == 200
            and "The site's policy cannot be read" in broken.text
            and "approval" in broken.text
        )


# -- tokens and the command ------------------------------------------------------------------


def test_tokens_are_stored_hashed_owner_only_and_the_first_start_makes_one_once(tmp_path: Path):
    home = tmp_path / "site"
    home.mkdir()
    tokens = DashboardTokens(home)
    first = tokens.first_start("night-shift")
    assert first is not None and first[0] == "night-shift"
    assert tokens.first_start() is None  # once
    stored = (home / TOKENS_FILE).read_text()
    assert first[1] not in stored and tokens.check(first[1]) == "night-shift"
    assert os.stat(home / TOKENS_FILE).st_mode & 0o777 == 0o600

    runner = CliRunner()
    added = runner.invoke(cli_app, ["site", "ui-token", "add", ADMIN, "--home", str(home)])
    assert added.exit_code == 0, added.output
    made = added.output.split()[-1]
    assert tokens.check(made) == ADMIN and made not in (home / TOKENS_FILE).read_text()
    again = runner.invoke(cli_app, ["site", "ui-token", "add", ADMIN, "--home", str(home)])
    assert again.exit_code != 0 and "already has a dashboard token" in str(again.exception)
    listed = runner.invoke(cli_app, ["site", "ui-token", "list", "--home", str(home)])
    assert "night-shift" in listed.output and ADMIN in listed.output and made not in listed.output
    assert runner.invoke(cli_app, ["site", "ui-token", "revoke", ADMIN, "--home", str(home)]).exit_code == 0
    assert tokens.check(made) is None

    os.chmod(home / TOKENS_FILE, 0o666)
    with pytest.raises(Exception, match="other users may edit"):
        tokens.check(made)


def test_the_dashboard_refuses_to_listen_beyond_loopback(tmp_path: Path):
    home = tmp_path / "site"
    home.mkdir()
    for host in ("0.0.0.0", "192.168.1.10", "::"):
        refused = CliRunner().invoke(cli_app, ["site", "ui", "--home", str(home), "--host", host])
        assert refused.exit_code != 0 and "loopback address only" in str(refused.exception), host
    assert not (home / TOKENS_FILE).exists()  # refused before anything was written


def test_the_first_start_prints_a_token_for_the_os_user_once_with_the_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import uvicorn

    served: list[uvicorn.Config] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets=None: served.append(server.config))
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)  # not onto the runner's closed stream
    monkeypatch.setenv("USER", "kealoha")
    monkeypatch.setenv("LOGNAME", "kealoha")
    home = tmp_path / "site"
    home.mkdir()
    first = CliRunner().invoke(cli_app, ["site", "ui", "--home", str(home), "--port", "8799"])
    assert first.exit_code == 0, first.output
    assert "dashboard token for kealoha" in first.output and "http://127.0.0.1:8799/login" in first.output
    printed = re.search(r"^\s+(\S{40,})$", first.output, re.M)
    assert printed and DashboardTokens(home).check(printed.group(1)) == "kealoha"
    again = CliRunner().invoke(cli_app, ["site", "ui", "--home", str(home), "--port", "8799"])
    assert (
        again.exit_code == 0
        and printed.group(1) not in again.output
        and "sign in with your dashboard token" in again.output
    )
    assert [(c.host, c.port) for c in served] == [("127.0.0.1", 8799)] * 2


# -- hostile requests ---------------------------------------------------------------------------
_PATH_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=40)
_HOSTILE = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH"]),
        "path": st.one_of(
            st.sampled_from(["/", "/login", "/logout", "/audit", "/fragments/pending", "/static/laulima.css"]),
            st.builds(
                lambda i, s: f"/jobs/{i}{s}",
                st.one_of(st.integers(-3, 3), st.just(10**30), _PATH_TEXT.map(lambda t: t.replace("/", ""))),
                st.sampled_from(["", "/approve", "/reject", "/x"]),
            ),
            st.builds(lambda t: f"/datasets/{t.replace('/', '')}/verify", _PATH_TEXT),
            st.builds(lambda t: "/" + t.lstrip("/"), _PATH_TEXT),  # "//x" would name a host
        ),
        "query": st.dictionaries(st.sampled_from(["page", "experiment", "next"]), st.text(max_size=20), max_size=2),
        "headers": st.dictionaries(
            st.sampled_from(["Origin", "Referer", "Content-Type", "If-None-Match", "Host"]),
            st.text(alphabet=string.printable.strip() + " ", max_size=60),
            max_size=3,
        ),
        "body": st.one_of(st.binary(max_size=200), st.text(max_size=60).map(lambda t: f"csrf_token={t}&reason={t}")),
        "signed_in": st.booleans(),
    }
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=_HOSTILE)
def test_no_hostile_request_breaks_the_dashboard_or_decides_a_job(site: Site, client: TestClient, token, request):
    if not hasattr(client, "_hostile_csrf"):
        client._hostile_csrf = sign_in(client, token)  # type: ignore[attr-defined]
        client._hostile_cookie = client.cookies.get(COOKIE)  # type: ignore[attr-defined]
    client.cookies.clear()
    if request["signed_in"]:
        client.cookies.set(COOKIE, client._hostile_cookie)  # type: ignore[attr-defined]
    try:
        response = client.request(
            request["method"], request["path"], params=request["query"], headers=request["headers"],
            content=request["body"] if isinstance(request["body"], bytes) else request["body"].encode(),
        )  # fmt: skip
    except UnicodeEncodeError:
        return  # the client itself cannot send such a header
    assert response.status_code < 500, (request, response.status_code)
    assert ApprovalStore(site.home).get(site.job_id).status == "pending", f"decided without its CSRF token: {request}"
