"""The site policy: policy.toml parsing (errors name file and field) and decide()'s rules."""

from __future__ import annotations

import base64
import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from laulima.core.privacy.messages import TaskPrivacy
from laulima.errors import ConfigurationError, ProtocolError
from laulima.site.policy import (
    POLICY_FILE,
    Decision,
    JobFacts,
    PrivacyPolicy,
    SitePolicy,
    Verdict,
    decide,
    default_policy_text,
    load_policy,
    parse_policy,
    privacy_refusal,
)

DIGEST = "ab" * 32
OTHER_DIGEST = "cd" * 32


def write_policy(home: Path, text: str) -> Path:
    path = home / POLICY_FILE
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return path


def ed25519_public(pem: bool) -> tuple[Ed25519PrivateKey, str]:
    key = Ed25519PrivateKey.generate()
    public = key.public_key()
    if pem:
        text = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return key, text.decode("ascii")
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key, base64.b64encode(raw).decode("ascii")


def facts(**overrides: Any) -> JobFacts:
    fields: dict[str, Any] = {
        "experiment_id": 7,
        "experiment_name": "brats-2024",
        "requester": "alice",
        "round": 0,
        "kind": "train",
        "entry_point": "laulima.algorithms.tabular:LogisticRegression",
        "bundle_digest": None,
        "bundle_signer": None,
        "dataset": "brain",
        "n_cases": 40,
        "rounds": 10,
        "task_time_limit_s": 600.0,
    }
    fields.update(overrides)
    return JobFacts(**fields)


def bundle(**overrides: Any) -> JobFacts:
    return facts(entry_point="my_algo:Model", bundle_digest=DIGEST, **overrides)


def policy(**data: Any) -> SitePolicy:
    return parse_policy(data)


# -- parsing -------------------------------------------------------------------------------


def test_missing_file_means_the_documented_defaults(tmp_path: Path) -> None:
    loaded = load_policy(tmp_path)
    assert loaded == SitePolicy()
    assert loaded.approval == "auto"
    assert loaded.algorithms.builtin is True and loaded.algorithms.digests == []
    assert loaded.min_cohort == 1
    assert loaded.sandbox.network is False and loaded.sandbox.on_unsupported == "refuse"
    assert loaded.datasets.allowed == ["*"]


def test_default_policy_text_parses_to_the_defaults(tmp_path: Path) -> None:
    text = default_policy_text()
    assert text.count("#") > 20  # it is documentation, not just settings
    write_policy(tmp_path, text)
    assert load_policy(tmp_path) == SitePolicy()


def test_every_field_is_read(tmp_path: Path) -> None:
    _, pem = ed25519_public(pem=True)
    _, raw = ed25519_public(pem=False)
    path = write_policy(
        tmp_path,
        f"""
approval = "manual"
approval_scope = "round"
evaluation_auto = false
min_cohort = 10
max_rounds = 100
max_task_seconds = 3600
max_memory_mb = 8192
max_cpu_seconds = 7200.5

[algorithms]
builtin = false
digests = ["{DIGEST}"]
[[algorithms.signers]]
name = "alice"
public_key = '''{pem}'''
[[algorithms.signers]]
name = "bob"
public_key = "{raw}"

[datasets]
allowed = ["brain", "chest-*"]
[[datasets.experiments]]
experiment = "brats-*"
allowed = ["brain-t2"]

[sandbox]
network = true
on_unsupported = "warn"
""",
    )
    loaded = load_policy(tmp_path)
    assert path.exists()
    assert loaded.approval == "manual" and loaded.approval_scope == "round"
    assert loaded.evaluation_auto is False
    assert (loaded.min_cohort, loaded.max_rounds, loaded.max_task_seconds) == (10, 100, 3600.0)
    assert (loaded.max_memory_mb, loaded.max_cpu_seconds) == (8192, 7200.5)
    assert loaded.algorithms.builtin is False and loaded.algorithms.digests == [DIGEST]
    assert [s.name for s in loaded.algorithms.signers] == ["alice", "bob"]
    assert set(loaded.signer_keys()) == {"alice", "bob"}
    assert loaded.datasets.allowed_for("brats-2024") == ["brain-t2"]
    assert loaded.datasets.allowed_for("other") == ["brain", "chest-*"]
    assert loaded.sandbox.network is True and loaded.sandbox.on_unsupported == "warn"


def test_a_pem_and_a_raw_key_are_the_same_key() -> None:
    key = Ed25519PrivateKey.generate()
    public = key.public_key()
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    raw = base64.b64encode(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()
    a = policy(algorithms={"signers": [{"name": "a", "public_key": pem}]}).algorithms.signers[0]
    b = policy(algorithms={"signers": [{"name": "a", "public_key": raw}]}).algorithms.signers[0]
    assert a.public_key == b.public_key == raw
    signature = key.sign(b"bundle")
    a.key().verify(signature, b"bundle")  # raises if the stored key were not the signer's
    assert a.raw_key() == public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("aproval = 'manual'", "aproval", "unknown field"),
        ("[algorithms]\nbuiltins = true", "algorithms.builtins", "unknown field"),
        ("[sandbox]\nnetwork = false\nfirewall = 1", "sandbox.firewall", "unknown field"),
        ("approval = 'sometimes'", "approval", "'auto' or 'manual'"),
        ("approval_scope = 'site'", "approval_scope", "'experiment' or 'round'"),
        ("evaluation_auto = 'yes'", "evaluation_auto", "boolean"),
        ("min_cohort = 0", "min_cohort", "greater than or equal to 1"),
        ("min_cohort = '10'", "min_cohort", "integer"),
        ("min_cohort = 2.5", "min_cohort", "integer"),
        ("max_rounds = 1000000", "max_rounds", "less than or equal"),
        ("max_task_seconds = inf", "max_task_seconds", "finite"),
        ("max_task_seconds = nan", "max_task_seconds", "finite"),
        ("max_cpu_seconds = -inf", "max_cpu_seconds", "finite"),
        ("max_task_seconds = 0", "max_task_seconds", "greater than 0"),
        ("max_task_seconds = 1e12", "max_task_seconds", "less than or equal"),
        ("max_memory_mb = 1", "max_memory_mb", "greater than or equal to 64"),
        ("max_memory_mb = 99999999999", "max_memory_mb", "less than or equal"),
        (f"[algorithms]\ndigests = ['{DIGEST}', 'xyz']", "algorithms.digests", "entry 1 ('xyz')"),
        (f"[algorithms]\ndigests = ['{DIGEST.upper()}']", "algorithms.digests", "64 lowercase hex"),
        (f"[algorithms]\ndigests = ['{DIGEST}', '{DIGEST}']", "algorithms.digests", "listed twice"),
        (
            "[[algorithms.signers]]\nname = 'alice'\npublic_key = 'bm90IGEga2V5'",
            "algorithms.signers[0].public_key",
            "not an Ed25519 public key",
        ),
        ("[[algorithms.signers]]\nname = 'a b'\npublic_key = 'x'", "algorithms.signers[0].name", "pattern"),
        ("[datasets]\nallowed = ['../etc']", "datasets.allowed[0]", "pattern"),
        ("[[datasets.experiments]]\nexperiment = 'x'", "datasets.experiments[0].allowed", "Field required"),
        ("[sandbox]\non_unsupported = 'ignore'", "sandbox.on_unsupported", "'refuse' or 'warn'"),
        ("[sandbox]\nnetwork = 1", "sandbox.network", "boolean"),
    ],
)
def test_a_bad_field_is_named_with_the_file(tmp_path: Path, text: str, field: str, words: str) -> None:
    path = write_policy(tmp_path, text)
    with pytest.raises(ConfigurationError) as info:
        load_policy(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{path}: field '{field}': "), message
    assert words in message
    assert info.value.context == {"file": str(path), "field": field}


def test_a_key_of_another_algorithm_is_refused() -> None:
    ec = generate_private_key(SECP256R1()).public_key()
    pem = ec.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    with pytest.raises(ConfigurationError, match=r"signers\[0\]\.public_key': not an Ed25519"):
        policy(algorithms={"signers": [{"name": "alice", "public_key": pem}]})


def test_two_signers_with_one_name_are_refused() -> None:
    _, raw = ed25519_public(pem=False)
    signers = [{"name": "alice", "public_key": raw}, {"name": "alice", "public_key": raw}]
    with pytest.raises(ConfigurationError, match="signer 'alice' is listed twice"):
        policy(algorithms={"signers": signers})


def test_broken_toml_names_the_file(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "approval = ")
    with pytest.raises(ConfigurationError, match=f"^{path}: not valid TOML"):
        load_policy(tmp_path)


@pytest.mark.skipif(os.name != "posix", reason="file modes")
def test_a_policy_other_users_may_edit_is_refused(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "approval = 'auto'\n")
    path.chmod(0o666)
    with pytest.raises(ConfigurationError, match="other users may edit the site policy.*chmod 600"):
        load_policy(tmp_path)
    path.chmod(0o644)  # readable is fine: a policy holds no secret
    assert load_policy(tmp_path).approval == "auto"


def test_an_oversized_policy_is_refused(tmp_path: Path) -> None:
    write_policy(tmp_path, "# " + "x" * (1024 * 1024) + "\n")
    with pytest.raises(ConfigurationError, match="larger than 1024 KiB"):
        load_policy(tmp_path)


def test_default_text_is_valid_toml_with_every_top_level_field() -> None:
    data = tomllib.loads(default_policy_text())
    documented = set(data) | {"max_rounds", "max_task_seconds", "max_memory_mb", "max_cpu_seconds"}
    assert documented == set(SitePolicy.model_fields)


# -- JobFacts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kind", "aggregate"),
        ("round", -1),
        ("rounds", True),
        ("n_cases", -3),
        ("task_time_limit_s", float("nan")),
        ("task_time_limit_s", float("inf")),
        ("bundle_digest", "nothex"),
        ("entry_point", "os.system"),
        ("dataset", "a\nb"),
    ],
)
def test_malformed_job_facts_are_refused_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ProtocolError, match=f"field '{field}' is malformed"):
        facts(**{field: value})


# -- decide(): refusals --------------------------------------------------------------------


def test_an_unbundled_module_that_is_not_a_builtin_is_refused() -> None:
    for entry in ("os:system", "antigravity:X", "laulima.cli:app", "laulima.algorithmsx:A"):
        decision = decide(SitePolicy(), facts(entry_point=entry))
        assert decision.verdict is Verdict.REFUSE, entry
        assert "neither a built-in" in decision.why


def test_a_dataset_the_policy_does_not_allow_is_refused() -> None:
    rules = policy(datasets={"allowed": ["brain"]})
    assert decide(rules, facts(dataset="other")) == Decision.refuse(
        "dataset 'other' is not allowed by the site's policy"
    )
    assert decide(rules, facts(dataset="brain")).verdict is Verdict.RUN


def test_the_first_matching_experiment_rule_replaces_allowed() -> None:
    rules = policy(
        datasets={
            "allowed": ["*"],
            "experiments": [
                {"experiment": "brats-*", "allowed": ["brain"]},
                {"experiment": "brats-2024", "allowed": ["other"]},  # shadowed by the first
                {"experiment": "locked", "allowed": []},
            ],
        }
    )
    assert decide(rules, facts(experiment_name="brats-2024", dataset="brain")).verdict is Verdict.RUN
    assert decide(rules, facts(experiment_name="brats-2024", dataset="other")).verdict is Verdict.REFUSE
    assert decide(rules, facts(experiment_name="locked", dataset="brain")).verdict is Verdict.REFUSE
    assert decide(rules, facts(experiment_name="anything", dataset="other")).verdict is Verdict.RUN
    assert decide(rules, facts(experiment_name="BRATS-2024", dataset="other")).verdict is Verdict.RUN  # case-sensitive


def test_a_small_cohort_is_refused() -> None:
    rules = policy(min_cohort=10)
    assert decide(rules, facts(n_cases=3)) == Decision.refuse("dataset 'brain' has 3 cases, policy min_cohort is 10")
    assert decide(rules, facts(n_cases=10)).verdict is Verdict.RUN


def test_an_uncountable_cohort_is_refused_only_when_a_minimum_is_set() -> None:
    assert decide(SitePolicy(), facts(n_cases=None)).verdict is Verdict.RUN
    decision = decide(policy(min_cohort=2), facts(n_cases=None))
    assert decision.verdict is Verdict.REFUSE and "cannot be counted" in decision.why


def test_too_many_rounds_are_refused() -> None:
    rules = policy(max_rounds=100)
    assert decide(rules, facts(rounds=500)) == Decision.refuse(
        "the experiment asks for 500 rounds, policy max_rounds is 100"
    )
    assert decide(rules, facts(rounds=100)).verdict is Verdict.RUN


def test_a_task_longer_than_the_site_allows_is_refused() -> None:
    rules = policy(max_task_seconds=3600)
    decision = decide(rules, facts(task_time_limit_s=7200.0))
    assert decision == Decision.refuse("the experiment's tasks may run 7200 s, policy max_task_seconds is 3600")
    assert decide(rules, facts(task_time_limit_s=3600.0)).verdict is Verdict.RUN
    assert decide(rules, facts(task_time_limit_s=None)).verdict is Verdict.RUN


def test_refusal_reasons_carry_no_paths() -> None:
    rules = policy(min_cohort=10, max_rounds=5, max_task_seconds=60, datasets={"allowed": ["brain"]})
    for job in (
        facts(dataset="other"),
        facts(n_cases=1),
        facts(n_cases=None),
        facts(rounds=6),
        facts(task_time_limit_s=61.0),
        facts(entry_point="os:system"),
    ):
        decision = decide(rules, job)
        assert decision.verdict is Verdict.REFUSE
        assert "/" not in decision.why and "\\" not in decision.why


# -- decide(): admission -------------------------------------------------------------------


def test_a_builtin_runs_without_asking() -> None:
    assert decide(SitePolicy(), facts()) == Decision.run("built-in algorithm admitted by policy")


def test_builtins_can_be_made_to_wait() -> None:
    decision = decide(policy(algorithms={"builtin": False}), facts())
    assert decision.verdict is Verdict.ASK and "not admitted" in decision.why


def test_a_bundle_named_like_a_builtin_is_not_a_builtin() -> None:
    job = facts(entry_point="laulima.algorithms.tabular:LogisticRegression", bundle_digest=OTHER_DIGEST)
    assert decide(SitePolicy(), job).verdict is Verdict.ASK


def test_an_admitted_digest_runs_and_another_waits() -> None:
    rules = policy(algorithms={"digests": [DIGEST]})
    assert decide(rules, bundle()) == Decision.run("digest admitted")
    other = decide(rules, facts(entry_point="my_algo:Model", bundle_digest=OTHER_DIGEST))
    assert other.verdict is Verdict.ASK and OTHER_DIGEST[:12] in other.why


def test_a_bundle_signed_by_a_listed_signer_runs() -> None:
    _, raw = ed25519_public(pem=False)
    rules = policy(algorithms={"signers": [{"name": "alice", "public_key": raw}]})
    assert decide(rules, bundle(bundle_signer="alice")) == Decision.run("signed by alice")
    assert decide(rules, bundle(bundle_signer="mallory")).verdict is Verdict.ASK
    assert decide(rules, bundle()).verdict is Verdict.ASK


# -- decide(): manual mode, evaluations, recorded decisions --------------------------------


def test_manual_mode_asks_even_for_admitted_algorithms() -> None:
    rules = policy(approval="manual", algorithms={"digests": [DIGEST]})
    for job in (facts(), bundle()):
        decision = decide(rules, job)
        assert decision.verdict is Verdict.ASK and "approval = manual" in decision.why


def test_a_recorded_approval_runs_a_job_that_would_wait() -> None:
    approved = Decision.run("approved by carol at 2025-01-02T03:04:05Z")
    assert decide(policy(approval="manual"), facts(), approval=approved) == approved
    assert decide(SitePolicy(), bundle(), approval=approved) == approved


def test_admission_in_auto_mode_does_not_need_the_approval() -> None:
    approved = Decision.run("approved by carol at 2025-01-02T03:04:05Z")
    assert decide(SitePolicy(), facts(), approval=approved) == Decision.run("built-in algorithm admitted by policy")


def test_a_recorded_rejection_wins_over_admission() -> None:
    rejected = Decision.refuse("rejected by the site's administrator: not this quarter")
    assert decide(SitePolicy(), facts(), approval=rejected) == rejected
    assert decide(policy(algorithms={"digests": [DIGEST]}), bundle(), approval=rejected) == rejected


def test_policy_refusals_win_over_a_recorded_approval() -> None:
    approved = Decision.run("approved by carol at 2025-01-02T03:04:05Z")
    decision = decide(policy(min_cohort=10), bundle(n_cases=3), approval=approved)
    assert decision == Decision.refuse("dataset 'brain' has 3 cases, policy min_cohort is 10")
    decision = decide(policy(datasets={"allowed": []}), facts(), approval=approved)
    assert decision.verdict is Verdict.REFUSE


def test_a_policy_refusal_comes_before_a_rejection() -> None:
    rejected = Decision.refuse("rejected by the site's administrator: no")
    decision = decide(policy(max_rounds=5), facts(rounds=6), approval=rejected)
    assert "max_rounds" in decision.why


def test_refusals_are_checked_in_their_documented_order() -> None:
    rules = policy(min_cohort=10, max_rounds=5, max_task_seconds=60, datasets={"allowed": ["brain"]})
    everything_wrong = facts(entry_point="os:system", dataset="other", n_cases=1, rounds=6, task_time_limit_s=61.0)
    expected_words = ["neither a built-in", "not allowed", "min_cohort", "max_rounds", "max_task_seconds"]
    job = everything_wrong
    fixes: list[dict[str, Any]] = [
        {"entry_point": "laulima.algorithms.identity:Identity"},
        {"dataset": "brain"},
        {"n_cases": 10},
        {"rounds": 5},
        {"task_time_limit_s": 60.0},
    ]
    for words, fix in zip(expected_words, fixes, strict=True):
        assert words in decide(rules, job).why
        job = dataclasses.replace(job, **fix)
    assert decide(rules, job).verdict is Verdict.RUN


def test_evaluations_of_admitted_algorithms_run_under_manual_when_evaluation_auto() -> None:
    rules = policy(approval="manual")
    decision = decide(rules, facts(kind="evaluate"))
    assert decision.verdict is Verdict.RUN and "evaluation-only" in decision.why
    assert decide(rules, facts(kind="train")).verdict is Verdict.ASK


def test_evaluation_auto_never_admits_an_unadmitted_algorithm() -> None:
    decision = decide(SitePolicy(), bundle(kind="evaluate"))
    assert decision.verdict is Verdict.ASK and "not admitted" in decision.why


def test_without_evaluation_auto_every_evaluation_waits_for_an_approval() -> None:
    rules = policy(evaluation_auto=False)
    decision = decide(rules, facts(kind="evaluate"))
    assert decision.verdict is Verdict.ASK and "evaluation_auto = false" in decision.why
    assert decide(rules, facts(kind="train")).verdict is Verdict.RUN
    approved = Decision.run("approved by carol at 2025-01-02T03:04:05Z")
    assert decide(rules, facts(kind="evaluate"), approval=approved) == approved


def test_ask_is_not_a_recorded_decision() -> None:
    with pytest.raises(ValueError, match="not ASK"):
        decide(SitePolicy(), bundle(), approval=Decision.ask("?"))


# -- [privacy] -----------------------------------------------------------------------------


def dp(**overrides: Any) -> TaskPrivacy:
    fields: dict[str, Any] = {"mode": "local", "clip": 1.0, "noise_multiplier": 1.1, "delta": 1e-5}
    fields.update(overrides)
    return TaskPrivacy(**fields)


def test_the_privacy_table_is_read(tmp_path: Path) -> None:
    write_policy(
        tmp_path,
        "[privacy]\nmax_epsilon = 8\ndelta = 1e-6\nmin_noise_multiplier = 0.5\nrequire = true\nmax_clip = 2.5\n",
    )
    rules = load_policy(tmp_path).privacy
    assert rules == PrivacyPolicy(max_epsilon=8.0, delta=1e-6, min_noise_multiplier=0.5, require=True, max_clip=2.5)


def test_without_a_privacy_table_there_is_no_budget_and_nothing_is_required() -> None:
    rules = SitePolicy().privacy
    assert (rules.max_epsilon, rules.delta, rules.min_noise_multiplier, rules.require, rules.max_clip) == (
        None,
        1e-5,
        0.0,
        False,
        None,
    )
    assert decide(SitePolicy(), facts()).verdict is Verdict.RUN  # a training job without DP runs


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("max_epsilon = 0", "privacy.max_epsilon", "greater than 0"),
        ("max_epsilon = -1.5", "privacy.max_epsilon", "greater than 0"),
        ("max_epsilon = inf", "privacy.max_epsilon", "finite"),
        ("max_epsilon = nan", "privacy.max_epsilon", "finite"),
        ("max_epsilon = '8'", "privacy.max_epsilon", "number"),
        ("delta = 0", "privacy.delta", "greater than 0"),
        ("delta = 0.02", "privacy.delta", "less than or equal to 0.01"),
        ("min_noise_multiplier = -0.1", "privacy.min_noise_multiplier", "greater than or equal to 0"),
        ("require = 'yes'", "privacy.require", "boolean"),
        ("max_clip = 0", "privacy.max_clip", "greater than 0"),
        ("budget = 8", "privacy.budget", "unknown field"),
    ],
)
def test_a_bad_privacy_field_is_named_with_the_file(tmp_path: Path, text: str, field: str, words: str) -> None:
    path = write_policy(tmp_path, f"[privacy]\n{text}\n")
    with pytest.raises(ConfigurationError) as info:
        load_policy(tmp_path)
    assert str(info.value).startswith(f"{path}: field '{field}': "), str(info.value)
    assert words in str(info.value)
    assert info.value.context == {"file": str(path), "field": field}


def test_require_refuses_training_without_dp_but_not_evaluations_or_fingerprints() -> None:
    rules = policy(privacy={"require": True})
    refused = decide(rules, facts())
    assert refused.verdict is Verdict.REFUSE and "[privacy] require = true" in refused.why
    assert decide(rules, facts(privacy=dp())).verdict is Verdict.RUN
    assert decide(rules, facts(kind="evaluate")).verdict is Verdict.RUN
    assert decide(rules, facts(kind="fingerprint")).verdict is Verdict.RUN


@pytest.mark.parametrize(
    ("rules", "privacy", "words"),
    [
        ({"min_noise_multiplier": 1.2}, dp(noise_multiplier=1.1), "noise multiplier 1.1 is below the site's"),
        ({"max_clip": 0.5}, dp(clip=1.0), "clip bound 1 is above the site's [privacy] max_clip 0.5"),
        ({"max_epsilon": 8.0, "delta": 1e-6}, dp(delta=1e-5), "δ = 1e-05 is above the δ = 1e-06"),
    ],
)
def test_privacy_floors_and_ceilings_refuse_training(rules: dict[str, Any], privacy: TaskPrivacy, words: str) -> None:
    decision = decide(policy(privacy=rules), facts(privacy=privacy))
    assert decision.verdict is Verdict.REFUSE and words in decision.why, decision.why
    assert privacy_refusal(policy(privacy=rules).privacy, privacy) == decision.why
    assert decide(policy(privacy=rules), facts(kind="evaluate", privacy=privacy)).verdict is Verdict.RUN


def test_at_the_floor_and_ceiling_training_runs_and_delta_is_bounded_only_under_a_budget() -> None:
    rules = policy(privacy={"min_noise_multiplier": 1.1, "max_clip": 1.0, "delta": 1e-6})
    assert decide(rules, facts(privacy=dp(noise_multiplier=1.1, clip=1.0, delta=1e-5))).verdict is Verdict.RUN
    budget = policy(privacy={"max_epsilon": 3.0, "delta": 1e-5})
    assert decide(budget, facts(privacy=dp(delta=1e-5))).verdict is Verdict.RUN
    assert decide(budget, facts(privacy=dp(delta=1e-6))).verdict is Verdict.RUN


def test_a_privacy_refusal_wins_over_a_recorded_approval() -> None:
    approved = Decision.run("approved by carol")
    decision = decide(policy(privacy={"min_noise_multiplier": 2.0}), bundle(privacy=dp()), approval=approved)
    assert decision.verdict is Verdict.REFUSE and "min_noise_multiplier" in decision.why
