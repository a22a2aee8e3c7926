"""The site dashboard in a real browser, over a real federation: an administrator signs in,
sees a held job arrive without reloading, reads its manifest and source, approves it with the
keyboard alone, and the site's agent takes it up and trains.

A real hub and a real site agent (LocalFederation: separate processes, mutual TLS), the
site's policy under ``approval = "manual"``, and ``laulima site ui`` as its own process on a
loopback port; headless Chromium through Selenium (``tests/helpers/browser.py``). Every page
is checked for low-contrast text and unlabelled controls, and saved under ``test-artefacts/``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from laulima.core.spec import parse_spec
from laulima.processes import SiteUiProcess, free_port
from laulima.site.approvals import ApprovalStore
from laulima.site.audit import AuditEvent, AuditLog
from laulima.site.policy import load_policy
from laulima.site.privacy_ledger import PrivacyLedger, format_epsilon
from laulima.site.ui.tokens import DashboardTokens
from tests.helpers.browser import check_page, chromium, screenshot
from tests.helpers.bundles import write_package
from tests.helpers.federation import assert_completed, logs

pytestmark = pytest.mark.slow

ADMIN = "dr.kealoha"
LONG = 600  # a round timeout no test may wait for


def _until(driver: Any, condition: Callable[[Any], Any], timeout: float, what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition, f"timed out waiting for {what}")


def _tab_to(driver: Any, element_id: str, limit: int = 120) -> None:
    """Press Tab from where the focus is until ``element_id`` has it: the keyboard path a person takes."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    for _ in range(limit):
        if driver.execute_script("return document.activeElement && document.activeElement.id") == element_id:
            return
        ActionChains(driver).send_keys(Keys.TAB).perform()
    raise AssertionError(f"#{element_id} cannot be reached with the Tab key")


def test_an_administrator_approves_a_held_job_in_the_browser_with_the_keyboard_and_the_site_trains(
    federation, tmp_path: Path
):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    fed = federation(1)
    home = fed.workdir / "sites" / "site-a"
    policy = home / "policy.toml"
    policy.write_text('approval = "manual"\n\n[privacy]\nmax_epsilon = 20.0\n')
    os.chmod(policy, 0o600)
    token = DashboardTokens(home).add(ADMIN)
    package = write_package(tmp_path / "scientist", "counter_algo")

    ui = SiteUiProcess(home, free_port())
    ui.start()
    try:
        ui.wait_ready()
        with chromium(1280, 900, what="the site dashboard's browser test") as driver:
            driver.get(f"{ui.url}/")
            assert "/login" in driver.current_url  # nothing without signing in
            check_page(driver, "sign-in")
            field = driver.find_element(By.ID, "token")
            field.send_keys(token)
            field.send_keys(Keys.ENTER)
            _until(driver, lambda d: d.find_elements(By.ID, "pending"), 15, "the overview")
            assert "No job waits for a decision." in driver.find_element(By.ID, "pending").text

            spec = parse_spec(
                {
                    "name": "counted",
                    "algorithm": "counter_algo.model:Counter",
                    "source": str(package),
                    "dataset": "none",
                    "rounds": 2,
                    "min_sites": 1,
                    "round_timeout_s": LONG,
                    "evaluation": {"every": 0, "final": False},
                    "privacy": {"clip": 1.0, "noise_multiplier": 1.0},
                }
            )
            exp = fed.submit(spec)
            # The job appears in the open page by itself (live.js polls the fragment), no reload.
            link = _until(
                driver,
                lambda d: d.find_elements(By.CSS_SELECTOR, "#pending-jobs a[href^='/jobs/']"),
                60,
                f"the held job to appear on the overview\n{logs(fed)}",
            )[0]
            assert driver.find_element(By.ID, "pending").get_attribute("data-refreshed")
            (job,) = ApprovalStore(home).pending()
            row = driver.find_element(By.CSS_SELECTOR, f"tr[data-job='{job.id}']").text
            assert "counted" in row and "sim-scientist" in row and job.digest is not None and job.digest[:12] in row
            assert fed.client.experiment(exp.id).status == "running"
            check_page(driver, "overview, a job waiting")
            screenshot(driver, "site-overview-pending")

            link.send_keys(Keys.ENTER)
            _until(driver, lambda d: d.find_elements(By.ID, "approve-form"), 15, "the job page")
            source = driver.find_element(By.ID, "source").text
            assert "class Counter(Algorithm):" in source and "counter_algo/model.py" in source
            manifest = driver.find_element(By.ID, "manifest-files").text
            assert "counter_algo/model.py" in manifest and "counter_algo/__init__.py" in manifest
            assert job.digest in driver.find_element(By.ID, "job-facts").text
            assert "manual" in driver.find_element(By.ID, "policy-facts").text
            check_page(driver, "job")
            screenshot(driver, "site-job")

            # Keyboard only: Tab to the approval's reason, type it, Tab to the button, Enter.
            driver.execute_script("document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0)")
            _tab_to(driver, "approve-reason")
            ActionChains(driver).send_keys("Read the source: it adds one per round.").perform()
            ActionChains(driver).send_keys(Keys.TAB).perform()
            assert driver.execute_script("return document.activeElement.id") == "approve-button"
            ActionChains(driver).send_keys(Keys.ENTER).perform()
            flash = _until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "p.flash"), 15, "the decision's message")
            assert f"job {job.id} approved by {ADMIN}" in flash[0].text
            assert f"Approved by {ADMIN}" in driver.find_element(By.ID, "decision").text
            decided = ApprovalStore(home).get(job.id)
            assert (decided.status, decided.decided_by, decided.reason) == (
                "approved",
                ADMIN,
                "Read the source: it adds one per round.",
            )
            check_page(driver, "job, decided")

            # The agent takes the job up at its next poll: the experiment trains to the end.
            done = fed.wait(exp.id, timeout=120)
            assert_completed(done, fed)
            assert [m.metrics["round"] for m in fed.client.metrics(exp.id) if m.kind == "train"] == [1.0, 2.0]
            events = [e.event for e in AuditLog(home).entries(experiment=exp.id)]
            assert AuditEvent.APPROVED in events and events.index(AuditEvent.APPROVED) < events.index(
                AuditEvent.STARTED
            )

            driver.get(f"{ui.url}/")
            rules = load_policy(home).privacy
            reserved = PrivacyLedger(home).spent("none", rules)
            budget = driver.find_element(By.CSS_SELECTOR, "#budget-table tr[data-dataset='none']").text
            assert format_epsilon(reserved) in budget and "20.00" in budget
            assert "No job waits for a decision." in driver.find_element(By.ID, "pending").text
            check_page(driver, "overview")
            screenshot(driver, "site-overview")

            driver.get(f"{ui.url}/audit")
            assert "intact" in driver.find_element(By.ID, "verification").text
            assert ADMIN in driver.find_element(By.CSS_SELECTOR, "table.audit").text
            check_page(driver, "audit")
            screenshot(driver, "site-audit")
    finally:
        ui.stop()  # the federation fixture stops the hub and the agent
