"""The scientist's `laulima algorithm` and the site administrator's `laulima site policy|jobs|approve|
reject|audit`, run through the real entry point (exit codes by error family) over real files."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from laulima.algorithms.bundle import PackedBundle, pack, verify_signature
from laulima.cli import main
from laulima.site.approvals import ApprovalStore
from laulima.site.audit import AUDIT_FILE, AuditEvent, AuditLog, canonical_json
from laulima.site.policy import JobFacts, load_policy, parse_policy

HEX64 = re.compile(r"\b[0-9a-f]{64}\b")


@dataclass
class Ran:
    code: int
    out: str
    err: str


Laulima = Callable[..., Ran]


@pytest.fixture
def laulima(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Laulima:
    """`laulima ARGS...` as a shell runs it: ``main()``, its exit code, its stdout and stderr."""
    monkeypatch.setenv("COLUMNS", "250")

    def run(*args: object) -> Ran:
        monkeypatch.setattr(sys, "argv", ["laulima", *map(str, args)])
        with pytest.raises(SystemExit) as exit_info:
            main()
        out, err = capsys.readouterr()
        code = exit_info.value.code
        return Ran(code if isinstance(code, int) else 1, out, err)

    return run


def write_package(root: Path, model_source: str | None = None) -> Path:
    """A scientist's algorithm package, with a file the bundle leaves out."""
    pkg = root / "tumour_net"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from tumour_net.model import TumourNet\n")
    (pkg / "model.py").write_text(
        model_source
        or "from laulima.algorithms.base import Algorithm\n\n\nclass TumourNet(Algorithm):\n    depth = 3\n"
    )
    (pkg / "notes.txt").write_text("not code\n")
    return pkg


# -- laulima algorithm ---------------------------------------------------------------------------


def test_pack_show_sign_and_the_printed_public_key_verifies_the_signature(
    laulima: Laulima, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = write_package(tmp_path / "src")
    monkeypatch.chdir(tmp_path)

    packed = laulima(
        "algorithm", "pack", pkg, "--entry-point", "tumour_net.model:TumourNet", "--requirement", "numpy>=1.26,<3"
    )
    assert packed.code == 0, packed.err
    digest = HEX64.search(packed.out).group(0)  # type: ignore[union-attr]
    bundle = tmp_path / f"{digest}.bundle"
    assert hashlib.sha256(bundle.read_bytes()).hexdigest() == digest
    assert "tumour_net.model:TumourNet" in packed.out and "numpy" in packed.out
    assert "notes.txt" in packed.err  # what was left out is said

    shown = laulima("algorithm", "show", bundle)
    assert shown.code == 0, shown.err
    assert f"{digest} (verified)" in shown.out
    model_sha = hashlib.sha256((pkg / "model.py").read_bytes()).hexdigest()
    assert f"{model_sha}  tumour_net/model.py" in shown.out and "notes.txt" not in shown.out
    assert "depth = 3" in laulima("algorithm", "show", bundle, "--source").out

    keygen = laulima("algorithm", "keygen", "--output", tmp_path / "alice.key")
    assert keygen.code == 0, keygen.err
    assert stat.S_IMODE((tmp_path / "alice.key").stat().st_mode) == 0o600
    public = re.search(r'public_key = "([^"]+)"', keygen.out).group(1)  # type: ignore[union-attr]
    assert laulima("algorithm", "pubkey", "--key", tmp_path / "alice.key").out.strip() == public

    signed = laulima("algorithm", "sign", digest, "--key", tmp_path / "alice.key")
    assert signed.code == 0, signed.err
    signature = signed.out.strip()
    assert verify_signature(digest, signature, base64.b64decode(public))
    assert laulima("algorithm", "sign", bundle, "--key", tmp_path / "alice.key").out.strip() == signature
    # The key as printed is what a site's policy takes.
    policy = parse_policy({"algorithms": {"signers": [{"name": "alice", "public_key": public}]}})
    assert policy.algorithms.signers[0].raw_key() == base64.b64decode(public)


def test_keygen_refuses_to_overwrite_a_key(laulima: Laulima, tmp_path: Path) -> None:
    key = tmp_path / "alice.key"
    assert laulima("algorithm", "keygen", "--output", key).code == 0
    before = key.read_bytes()
    again = laulima("algorithm", "keygen", "--output", key)
    assert again.code == 2 and "already exists" in again.err and str(key) in again.err
    assert key.read_bytes() == before


def test_sign_refuses_a_digest_that_is_not_one_and_a_missing_key(laulima: Laulima, tmp_path: Path) -> None:
    assert laulima("algorithm", "keygen", "--output", tmp_path / "k").code == 0
    bad = laulima("algorithm", "sign", "abc123", "--key", tmp_path / "k")
    assert bad.code == 2 and "64 lowercase hex digits" in bad.err and bad.out == ""
    missing = laulima("algorithm", "sign", "ab" * 32, "--key", tmp_path / "nope")
    assert missing.code == 2 and "cannot read the signing key" in missing.err


def test_show_refuses_a_bundle_changed_after_packing(laulima: Laulima, tmp_path: Path) -> None:
    packed = pack(write_package(tmp_path / "src"), "tumour_net.model:TumourNet")
    path = packed.save(tmp_path / f"{packed.digest}.bundle")
    data = bytearray(path.read_bytes())
    data[600] ^= 1
    path.write_bytes(bytes(data))
    shown = laulima("algorithm", "show", path)
    assert shown.code == 3 and f"does not match the expected {packed.digest}" in shown.err


def test_source_is_shown_with_control_characters_made_visible(laulima: Laulima, tmp_path: Path) -> None:
    hostile = (
        "from laulima.algorithms.base import Algorithm\n\n\nclass TumourNet(Algorithm):\n"
        '    note = "\x1b[2J\x1b[Hall clear"  # \u202e hidden direction\n'
    )
    packed = pack(write_package(tmp_path / "src", hostile), "tumour_net.model:TumourNet")
    path = packed.save(tmp_path / f"{packed.digest}.bundle")
    shown = laulima("algorithm", "show", path, "--source")
    assert shown.code == 0, shown.err
    assert "\x1b" not in shown.out and "\u202e" not in shown.out
    assert "\\x1b[2J" in shown.out and "\\u202e" in shown.out and "3 control characters" in shown.out


# -- site init and the policy --------------------------------------------------------------------


def test_site_init_writes_the_default_policy_private_and_keeps_an_existing_one(laulima: Laulima, tmp_path: Path):
    home = tmp_path / "site"
    args = ("site", "init", "--home", home, "--name", "site-a", "--hub", "http://127.0.0.1:8780", "--site-token", "t")
    first = laulima(*args)
    assert first.code == 0, first.err
    policy = home / "policy.toml"
    assert stat.S_IMODE(policy.stat().st_mode) == 0o600
    assert load_policy(home) == parse_policy({})  # the commented file gives the defaults
    policy.write_text('approval = "manual"\n')
    assert laulima(*args).code == 0
    assert policy.read_text() == 'approval = "manual"\n'


def test_policy_show_prints_toml_that_parses_back_to_the_policy_in_force(laulima: Laulima, tmp_path: Path):
    home = tmp_path / "site"
    home.mkdir()
    key = laulima("algorithm", "keygen", "--output", tmp_path / "k")
    public = re.search(r'public_key = "([^"]+)"', key.out).group(1)  # type: ignore[union-attr]
    (home / "policy.toml").write_text(
        'approval = "manual"\nmax_rounds = 50\nmax_task_seconds = 90.5\n'
        f'[algorithms]\ndigests = ["{"ab" * 32}"]\n'
        f'[[algorithms.signers]]\nname = "alice"\npublic_key = "{public}"\n'
        '[datasets]\nallowed = []\n[[datasets.experiments]]\nexperiment = "brats-*"\nallowed = ["brain"]\n'
    )
    os.chmod(home / "policy.toml", 0o600)
    shown = laulima("site", "policy", "show", "--home", home)
    assert shown.code == 0, shown.err
    assert shown.out.startswith(f"# the policy in force, read from {home / 'policy.toml'}")
    assert parse_policy(tomllib.loads(shown.out)) == load_policy(home)
    checked = laulima("site", "policy", "check", "--home", home)
    assert checked.code == 0 and checked.out.count("\n") == 1
    assert "policy OK: approval=manual" in checked.out and "signers=alice" in checked.out
    assert "max_rounds=50" in checked.out and "max_task_seconds=90.5" in checked.out


def test_policy_show_without_a_file_says_the_defaults_apply(laulima: Laulima, tmp_path: Path):
    shown = laulima("site", "policy", "show", "--home", tmp_path)
    assert shown.code == 0 and "does not exist: these defaults apply" in shown.out
    assert parse_policy(tomllib.loads(shown.out)) == parse_policy({})


@pytest.mark.parametrize(
    ("text", "mode", "words"),
    [
        ("min_cohort = 0\n", 0o600, "field 'min_cohort'"),
        ('[sandbox]\nnetwork = "yes"\n', 0o600, "field 'sandbox.network'"),
        ('approval = "auto"\napprovel = "manual"\n', 0o600, "field 'approvel': unknown field"),
        ("approval = \n", 0o600, "not valid TOML"),
        ('approval = "auto"\n', 0o666, "other users may edit the site policy"),
    ],
)
def test_policy_check_names_what_is_wrong_and_exits_2(
    laulima: Laulima, tmp_path: Path, text: str, mode: int, words: str
):
    (tmp_path / "policy.toml").write_text(text)
    os.chmod(tmp_path / "policy.toml", mode)
    checked = laulima("site", "policy", "check", "--home", tmp_path)
    assert checked.code == 2 and words in checked.err and str(tmp_path / "policy.toml") in checked.err
    assert checked.out == "" and checked.err.startswith("error: ")


# -- jobs, approvals and the audit ---------------------------------------------------------------


@dataclass
class Site:
    home: Path
    bundle: PackedBundle


def facts(bundle: PackedBundle | None, experiment: int = 7, **overrides: object) -> JobFacts:
    values: dict[str, object] = {
        "experiment_id": experiment,
        "experiment_name": f"brats-{experiment}",
        "requester": "alice",
        "round": 0,
        "kind": "train",
        "entry_point": bundle.manifest.entry_point if bundle else "laulima.algorithms.identity:Identity",
        "bundle_digest": bundle.digest if bundle else None,
        "bundle_signer": None,
        "dataset": "brain",
        "n_cases": 40,
        "rounds": 20,
        "task_time_limit_s": None,
    }
    values.update(overrides)
    return JobFacts(**values)  # type: ignore[arg-type]


@pytest.fixture
def site(tmp_path: Path) -> Site:
    """A site home with two held jobs (a bundle, kept as the agent keeps it, and a built-in)."""
    home = tmp_path / "site"
    bundle = pack(write_package(tmp_path / "src"), "tumour_net.model:TumourNet", requirements=["numpy>=1.26"])
    (home / "bundles").mkdir(parents=True)
    bundle.save(home / "bundles" / f"{bundle.digest}.bundle")
    store = ApprovalStore(home)
    manifest = json.loads(bundle.manifest.to_json())
    store.request(facts(bundle), task_id="t-100", algorithm_name="tumour_net", manifest=manifest)
    store.request(facts(None, experiment=8, kind="evaluate"), task_id="t-200", scope="round")
    return Site(home, bundle)


def test_jobs_lists_what_waits_and_show_gives_manifest_and_verified_source(laulima: Laulima, site: Site):
    listed = laulima("site", "jobs", "--home", site.home)
    assert listed.code == 0, listed.err
    row = next(line for line in listed.out.splitlines() if "brats-7" in line)
    for cell in ("1", "7 brats-7", "alice", "tumour_net", site.bundle.digest[:12], "brain", "20", "train", "pending"):
        assert cell in row, (cell, row)
    assert any("brats-8" in line and "built-in" in line for line in listed.out.splitlines())

    shown = laulima("site", "jobs", "show", "1", "--home", site.home)
    assert shown.code == 0, shown.err
    assert site.bundle.digest in shown.out and "requested by alice" in shown.out
    assert "numpy>=1.26" in shown.out
    for path, sha in site.bundle.manifest.files.items():
        assert f"{sha}  {path}" in shown.out
    assert "class TumourNet" not in shown.out

    with_source = laulima("site", "jobs", "show", "1", "--source", "--home", site.home)
    assert with_source.code == 0, with_source.err
    assert "──── tumour_net/model.py ────" in with_source.out and "class TumourNet(Algorithm):" in with_source.out

    builtin = laulima("site", "jobs", "--home", site.home, "show", "2", "--source")
    assert builtin.code == 0 and "built-in algorithm" in builtin.out and "round 0 only" in builtin.out


def test_show_source_says_when_the_archive_is_missing_or_not_the_one_under_review(laulima: Laulima, site: Site):
    archive = site.home / "bundles" / f"{site.bundle.digest}.bundle"
    other = pack(write_package(site.home.parent / "other", "class Other:\n    pass\n"), "tumour_net.model:Other")
    archive.write_bytes(other.data)
    swapped = laulima("site", "jobs", "show", "1", "--source", "--home", site.home)
    assert swapped.code == 3 and "does not match the expected" in swapped.err and "class Other" not in swapped.out
    archive.unlink()
    missing = laulima("site", "jobs", "show", "1", "--source", "--home", site.home)
    assert missing.code == 3 and str(archive) in missing.err and "is missing" in missing.err
    assert site.bundle.digest in missing.out  # the job itself was still shown


def test_approve_is_recorded_in_the_audit_log_and_the_log_then_verifies(laulima: Laulima, site: Site):
    approved = laulima("site", "approve", "1", "--home", site.home, "--by", "dr.kealoha", "--reason", "read the code")
    assert approved.code == 0, approved.err
    assert "job 1 approved by dr.kealoha" in approved.out and "audit#1" in approved.out
    job = ApprovalStore(site.home).get(1)
    assert (job.status, job.decided_by, job.reason) == ("approved", "dr.kealoha", "read the code")
    (entry,) = AuditLog(site.home).entries()
    assert entry.event == AuditEvent.APPROVED and (entry.experiment, entry.task) == (7, "t-100")
    fields = entry.fields
    assert (fields["by"], fields["reason"], fields["scope"], fields["job"]) == (
        "dr.kealoha",
        "read the code",
        "experiment",
        1,
    )
    assert fields["digest"] == site.bundle.digest and fields["dataset"] == "brain"

    rejected = laulima("site", "reject", "2", "--home", site.home, "--reason", "not this quarter")
    assert rejected.code == 0, rejected.err
    second = AuditLog(site.home).entries()[1]
    assert second.event == AuditEvent.REJECTED and second.fields["scope"] == "round" and second.fields["round"] == 0
    assert second.fields["by"]  # the OS user, when --by is not given

    verified = laulima("site", "audit", "verify", "--home", site.home)
    assert verified.code == 0 and "audit log OK: 2 entries" in verified.out
    shown = laulima("site", "audit", "show", "--home", site.home, "--experiment", "7")
    assert shown.code == 0 and shown.out.count("\n") == 1 and "approved  experiment 7, task t-100" in shown.out
    assert "#2" in laulima("site", "audit", "show", "--home", site.home, "--limit", "1").out


def test_deciding_an_unknown_or_decided_job_exits_2_and_records_nothing(laulima: Laulima, site: Site):
    assert laulima("site", "approve", "1", "--home", site.home).code == 0
    again = laulima("site", "reject", "1", "--home", site.home, "--reason", "changed my mind")
    assert again.code == 2 and "already approved" in again.err
    unknown = laulima("site", "approve", "99", "--home", site.home)
    assert unknown.code == 2 and "no job 99" in unknown.err
    not_a_number = laulima("site", "jobs", "show", "one", "--home", site.home)
    assert not_a_number.code == 2 and "not a job id" in not_a_number.err
    no_reason = laulima("site", "reject", "2", "--home", site.home)
    assert no_reason.code == 2 and "--reason" in no_reason.err
    assert [e.event for e in AuditLog(site.home).entries()] == [AuditEvent.APPROVED]
    assert ApprovalStore(site.home).get(2).status == "pending"


def test_approve_refuses_to_decide_when_the_audit_log_cannot_be_written(laulima: Laulima, site: Site):
    assert laulima("site", "approve", "1", "--home", site.home).code == 0
    (site.home / "audit.head").unlink()  # the log's end can no longer be checked: appends fail closed
    refused = laulima("site", "reject", "2", "--home", site.home, "--reason", "no")
    assert refused.code == 3 and "nothing was decided" in refused.err and "audit.head is missing" in refused.err
    assert ApprovalStore(site.home).get(2).status == "pending"
    assert laulima("site", "audit", "reanchor", "--home", site.home, "--reason", "cleanup script, ticket 9").code == 0
    assert laulima("site", "reject", "2", "--home", site.home, "--reason", "no").code == 0
    assert laulima("site", "audit", "verify", "--home", site.home).code == 0


def test_a_tampered_audit_log_fails_verify_with_exit_1_naming_the_line(laulima: Laulima, site: Site):
    assert laulima("site", "approve", "1", "--home", site.home, "--reason", "ok").code == 0
    assert laulima("site", "reject", "2", "--home", site.home, "--reason", "no").code == 0
    lines = (site.home / AUDIT_FILE).read_bytes().splitlines(keepends=True)
    entry = json.loads(lines[0])
    entry["fields"]["by"] = "someone-else"
    lines[0] = canonical_json(entry) + b"\n"
    (site.home / AUDIT_FILE).write_bytes(b"".join(lines))
    verified = laulima("site", "audit", "verify", "--home", site.home)
    assert verified.code == 1
    assert "audit log DAMAGED: line 1: its hash does not match its content" in verified.err
    assert "0 entries verified before the problem" in verified.out
