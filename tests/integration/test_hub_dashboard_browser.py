"""The hub's dashboard in a real browser (headless Chromium) against a real hub and real agents
over mutual TLS: the experiment's chart gains a point when a round completes without a reload,
the downloads are the hub's model and its card, and nobody without the right session sees or
changes anything — a signed-out visitor, another scientist, a revoked token, a forged form
from another site, a form without its CSRF token.

Screenshots of each page go to ``test-artefacts/`` (the README shows one).
"""

from __future__ import annotations

import http.server
import re
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from laulima.core.spec import parse_spec
from laulima.sim import LocalFederation
from tests.helpers.browser import check_page, chromium, console_problems, screenshot
from tests.helpers.bundles import packed_fields
from tests.helpers.federation import logs, wait_for

pytestmark = pytest.mark.slow

ROUNDS = 5
CHART = "chart-evaluate-mean-w"


def counter_spec(name: str, *, sleep_s: float, rounds: int = ROUNDS, cross_site: bool = False) -> Any:
    """SlowCounter at two sites, evaluated every round: each round adds one point per site and
    one for the mean to the evaluation chart (site-a sleeps ``sleep_s``, site-b twice that)."""
    return parse_spec(
        {
            "name": name,
            **packed_fields("SlowCounter"),
            "dataset": "none",
            "rounds": rounds,
            "min_sites": 2,
            "round_timeout_s": 120,
            "evaluation": {"every": 1, "final": True, "cross_site": cross_site},
            "config": {"size": 4, "sleep_s": sleep_s},
        }
    )


def sign_in(driver: Any, fed: LocalFederation, token: str, then: str = "/ui/") -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.delete_all_cookies()
    driver.get(f"{fed.hub.url}/ui/login?next={then}")
    field = driver.find_element(By.ID, "token")
    field.send_keys(token)
    field.send_keys(Keys.ENTER)  # the keyboard is enough to sign in
    wait_for(lambda: "/login" not in driver.current_url, 10, "the sign-in to go through")


def page_checks(driver: Any, name: str) -> None:
    """The checks every page passes, then a screenshot for the record."""
    check_page(driver, name)
    screenshot(driver, name)


def points(driver: Any) -> int:
    return int(driver.execute_script(f"const c = document.getElementById('{CHART}'); return c ? +c.dataset.points : 0"))


@pytest.fixture
def browser() -> Iterator[Any]:
    with chromium(1280, 900, what="the dashboard's browser test") as driver:
        yield driver


def test_the_experiment_chart_gains_points_as_rounds_complete_without_a_reload(federation, browser, tmp_path):
    fed = federation(2)
    exp = fed.submit(counter_spec("live-chart", sleep_s=1.0, cross_site=True))
    sign_in(browser, fed, fed.client.token, then=f"/ui/experiments/{exp.id}")
    assert browser.current_url.endswith(f"/ui/experiments/{exp.id}"), browser.current_url
    browser.execute_script("window.__sameDocument = 'kept';")  # a reload would lose it
    start = points(browser)
    at_load = fed.client.experiment(exp.id).rounds_done
    assert at_load < ROUNDS - 1, f"the experiment ran too fast to watch: round {at_load} of {ROUNDS} at page load"

    # the hub completes a round (its evaluation reported) ...
    def evaluated_rounds() -> int:
        return len({m.round for m in fed.client.metrics(exp.id) if m.kind == "evaluate" and m.model is None})

    wait_for(lambda: evaluated_rounds() > start // 3, 60, "a round's evaluation to reach the hub")
    # ... and the open page shows its points, without being reloaded
    wait_for(lambda: points(browser) > start, 15, "the chart to gain a point")
    assert browser.execute_script("return window.__sameDocument") == "kept", "the page was reloaded"
    # a reader who unfolded the chart's numbers keeps them unfolded when the region next changes
    # (a round, the cross-site evaluation or the end: something always follows)
    refreshed = "return document.getElementById('experiment-live').getAttribute('data-refreshed')"
    before = browser.execute_script(refreshed)
    browser.execute_script(f"document.getElementById('{CHART}-numbers').open = true")
    wait_for(lambda: browser.execute_script(refreshed) != before, 60, "the live region's next refresh")
    assert browser.execute_script(f"return document.getElementById('{CHART}-numbers').open") is True
    shown = int(browser.find_element("id", "rounds-done").text)
    assert shown >= 1

    done = fed.wait(exp.id, timeout=120)
    assert done.status == "completed", logs(fed)
    # the page settles on every point of every round: 2 sites + their mean, per evaluated round
    final_points = 3 * evaluated_rounds()
    wait_for(lambda: points(browser) == final_points, 15, f"{final_points} points on the chart")
    assert browser.execute_script("return window.__sameDocument") == "kept"
    values = browser.execute_script(
        f"return [...document.querySelectorAll('#{CHART} .point')]"
        ".map(p => [p.dataset.series, +p.dataset.x, +p.dataset.y])"
    )
    hub_values = {(m.site, m.round): m.metrics["mean_w"] for m in fed.client.metrics(exp.id) if m.kind == "evaluate"}
    for series, x, y in values:
        if series in ("site-a", "site-b"):
            assert y == pytest.approx(hub_values[(series, x)], rel=1e-5), (series, x)
    # the cross-site evaluation after training arrived in the open page too, with the hub's numbers
    wait_for(lambda: browser.find_elements("id", "cross-site"), 15, "the cross-site matrix")
    matrix = fed.client.cross_site(exp.id)
    assert matrix.complete and matrix.sites == ["site-a", "site-b"]
    row = browser.find_element("css selector", "#cross-site tbody tr").text.split()
    expected = [matrix.cells["global"][s].metrics["mean_w"] for s in matrix.sites]
    assert row[0] == "global" and [float(v) for v in row[1:3]] == pytest.approx(expected, rel=1e-3)
    page_checks(browser, "hub-experiment")

    # the downloads are the hub's model (its sha256 is the experiment's digest) and its card
    digest = browser.execute_async_script(
        """const done = arguments[arguments.length - 1];
        fetch(arguments[0]).then(r => r.arrayBuffer()).then(b => crypto.subtle.digest('SHA-256', b))
          .then(h => done([...new Uint8Array(h)].map(x => x.toString(16).padStart(2, '0')).join('')));""",
        f"{fed.hub.url}/ui/experiments/{exp.id}/model",
    )
    assert digest == done.global_digest
    card = browser.execute_async_script(
        "const done = arguments[arguments.length - 1]; fetch(arguments[0]).then(r => r.json()).then(done);",
        f"{fed.hub.url}/ui/experiments/{exp.id}/card",
    )
    assert card["weights"]["sha256"] == done.global_digest and card["rounds"]["done"] == ROUNDS
    assert card["evaluation"]["round"] == ROUNDS and set(card["evaluation"]["per_site"]) == {"site-a", "site-b"}

    browser.get(f"{fed.hub.url}/ui/")
    row = browser.find_element("css selector", f"tr[data-experiment='{exp.id}']").text
    assert "live-chart" in row and "completed" in row and f"{ROUNDS}/{ROUNDS}" in row
    page_checks(browser, "hub-overview-scientist")
    sign_in(browser, fed, fed.hub.admin_token)
    sites = browser.find_element("id", "sites").text
    assert "site-a" in sites and "site-b" in sites and "online" in sites
    page_checks(browser, "hub-overview-operator")


class _AttackerPage(http.server.BaseHTTPRequestHandler):
    """Another web site, whose page posts a form to the hub's cancel button as soon as it opens."""

    target = ""

    def do_GET(self) -> None:  # noqa: N802 - the standard library's name
        body = (
            "<!doctype html><title>cute cats</title>"
            f'<form id="f" method="post" action="{self.target}"><input name="reason" value="x"></form>'
            "<script>document.getElementById('f').submit()</script>"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_nobody_without_the_right_session_sees_or_changes_anything(federation, browser):
    fed = federation(2)
    exp = fed.submit(counter_spec("guarded", sleep_s=3.0, rounds=50))
    url = fed.hub.url
    verify = ssl.create_default_context(cafile=str(fed.hub.ca_file))
    detail = [
        f"/ui/experiments/{exp.id}",
        f"/ui/experiments/{exp.id}/live",
        f"/ui/experiments/{exp.id}/card",
        f"/ui/experiments/{exp.id}/model",
        "/ui/live/overview",
        "/ui/",
    ]

    # a signed-out visitor: pages send them to the sign-in form, the rest answers 401; no data either way
    with httpx.Client(base_url=url, verify=verify) as anonymous:
        for path in detail:
            r = anonymous.get(path)
            assert r.status_code in (303, 401), (path, r.status_code)
            assert "guarded" not in r.text and "site-a" not in r.text, path
            if r.status_code == 303:
                assert r.headers["location"].startswith("/ui/login"), path
        r = anonymous.post(f"/ui/experiments/{exp.id}/cancel", data={"csrf_token": "x"})
        assert r.status_code == 401
    browser.delete_all_cookies()
    browser.get(f"{url}/ui/experiments/{exp.id}")
    assert "/ui/login" in browser.current_url and "guarded" not in browser.page_source
    page_checks(browser, "hub-sign-in")

    # a wrong token is refused at the form
    browser.find_element("id", "token").send_keys("not-a-token\n")
    wait_for(lambda: "unknown or has been revoked" in browser.page_source, 10, "the refusal")
    assert "/ui/login" in browser.current_url

    # another scientist: the experiment is not theirs, so it does not exist for them; no sites table
    bob = fed.operator.create_token("bob", "scientist")
    sign_in(browser, fed, bob.token)
    assert "guarded" not in browser.page_source and 'id="sites"' not in browser.page_source
    browser.get(f"{url}/ui/experiments/{exp.id}")
    assert "Not found" in browser.page_source and "guarded" not in browser.page_source
    with _session(url, verify, bob.token) as (bob_http, bob_csrf):
        r = bob_http.post(f"/ui/experiments/{exp.id}/cancel", data={"csrf_token": bob_csrf})
        assert r.status_code == 404
        assert bob_http.get(f"/ui/experiments/{exp.id}/model").status_code == 404
    # shared with bob: he may read it, but only its owner or an operator may cancel it
    fed.client.share(exp.id, "bob")
    browser.get(f"{url}/ui/experiments/{exp.id}")
    assert "guarded" in browser.page_source and "Cancel this experiment" not in browser.page_source
    with _session(url, verify, bob.token) as (bob_http, bob_csrf):
        r = bob_http.post(f"/ui/experiments/{exp.id}/cancel", data={"csrf_token": bob_csrf})
        assert r.status_code == 403
    # a revoked token ends the sessions it opened, at the next request
    fed.operator.revoke_token(bob.id)
    browser.get(f"{url}/ui/experiments/{exp.id}")
    assert "/ui/login" in browser.current_url and "guarded" not in browser.page_source

    # the owner is signed in, and another web site's page posts to the cancel button
    sign_in(browser, fed, fed.client.token, then=f"/ui/experiments/{exp.id}")
    attacker = http.server.ThreadingHTTPServer(("localhost", 0), _AttackerPage)
    _AttackerPage.target = f"{url}/ui/experiments/{exp.id}/cancel"
    threading.Thread(target=attacker.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://localhost:{attacker.server_address[1]}/")
        wait_for(lambda: browser.current_url.startswith(url), 10, "the forged form to reach the hub")
        time.sleep(0.5)
    finally:
        attacker.shutdown()
    assert fed.client.experiment(exp.id).status == "running", "a forged cross-site form cancelled the experiment"
    # the owner's own session, without the form's CSRF token, or from another origin: refused too
    with _session(url, verify, fed.client.token) as (owner_http, csrf):
        assert owner_http.post(f"/ui/experiments/{exp.id}/cancel", data={}).status_code == 403
        assert owner_http.post(f"/ui/experiments/{exp.id}/cancel", data={"csrf_token": "guess"}).status_code == 403
        foreign = {"Origin": "https://evil.example"}
        r = owner_http.post(f"/ui/experiments/{exp.id}/cancel", data={"csrf_token": csrf}, headers=foreign)
        assert r.status_code == 403 and "cross-site" in r.text
    assert fed.client.experiment(exp.id).status == "running"

    # the owner's own button, pressed from the keyboard, does cancel it
    from selenium.webdriver.common.keys import Keys

    console_problems(browser)  # the refusals above were logged as failed loads; this page starts clean
    browser.get(f"{url}/ui/experiments/{exp.id}")
    button = browser.find_element("xpath", "//button[normalize-space()='Cancel this experiment']")
    button.send_keys(Keys.ENTER)
    wait_for(lambda: fed.client.experiment(exp.id).status == "cancelled", 15, "the cancel to take effect")
    page_checks(browser, "hub-experiment-cancelled")


class _session:
    """An HTTP client holding a dashboard session of ``token`` and the session's CSRF token."""

    def __init__(self, url: str, verify: ssl.SSLContext, token: str) -> None:
        self.http = httpx.Client(base_url=url, verify=verify)
        self.token = token

    def __enter__(self) -> tuple[httpx.Client, str]:
        form = self.http.get("/ui/login").text
        login_csrf = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)  # type: ignore[union-attr]
        r = self.http.post("/ui/login", data={"csrf_token": login_csrf, "token": self.token, "next": "/ui/"})
        assert r.status_code == 303, r.text
        page = self.http.get("/ui/").text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        return self.http, csrf

    def __exit__(self, *exc: Any) -> None:
        self.http.close()
