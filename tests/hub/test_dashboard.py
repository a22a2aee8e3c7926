"""The hub's dashboard through a real hub app (TestClient): who may see and do what, what the
cookies and headers say, and that every number on a page is the API's. The browser's view
(live charts, keyboard, cross-site forms) is tests/integration/test_hub_dashboard_browser.py."""

from __future__ import annotations

import html
import json
import re
from typing import Any

import pytest

from laulima.hub.audit import HubAuditLog
from tests.hub.conftest import ADMIN_TOKEN, Hub, make_weights, spec, update_bytes

HOSTILE = '<img src=x onerror="alert(1)">'


def csrf_in(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "no CSRF token on the page"
    return found.group(1)


def sign_in(hub: Hub, token: str, *, next_url: str = "/ui/") -> Any:
    form = hub.client.get("/ui/login")
    return hub.client.post(
        "/ui/login",
        data={"csrf_token": csrf_in(form.text), "token": token, "next": next_url},
        follow_redirects=False,
    )


def token_of(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


@pytest.fixture
def secure_hub(hub: Hub) -> Hub:
    hub.client.base_url = "https://testserver"  # type: ignore[assignment] - as behind TLS: Secure cookies
    return hub


def run_round(hub: Hub, exp_id: int, loss: dict[str, float]) -> None:
    for site, value in loss.items():
        task = hub.next_task(site)
        assert task is not None and task.experiment_id == exp_id
        r = hub.upload(site, task, update_bytes(make_weights(1), n_samples=10, metrics={"loss": value}))
        assert r.status_code in (200, 201), r.text


def test_a_signed_out_visitor_sees_nothing_and_is_sent_to_sign_in(secure_hub: Hub) -> None:
    exp = secure_hub.submit(spec(name="secret-study"), make_weights())
    client = secure_hub.client
    for path in ("/ui/", f"/ui/experiments/{exp['id']}"):
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == f"/ui/login?next={path}"
    for path in (f"/ui/experiments/{exp['id']}/live", f"/ui/experiments/{exp['id']}/card", "/ui/live/overview"):
        r = client.get(path)
        assert r.status_code == 401 and "secret-study" not in r.text
    r = client.post(f"/ui/experiments/{exp['id']}/cancel", data={"csrf_token": "x"})
    assert r.status_code == 401
    assert secure_hub.experiment(exp["id"])["status"] == "running"
    assert client.get("/ui/static/laulima.css").status_code == 200  # the stylesheet is the same for all


def test_the_session_cookie_is_httponly_secure_samesite_and_scoped_to_the_dashboard(secure_hub: Hub) -> None:
    r = sign_in(secure_hub, ADMIN_TOKEN)
    assert r.status_code == 303 and r.headers["location"] == "/ui/"
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("laulima_hub_session="))
    flags = {part.strip().lower() for part in cookie.split(";")}
    assert {"httponly", "secure", "samesite=strict", "path=/ui"} <= flags
    page = secure_hub.client.get("/ui/")
    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
    # the API never accepts the dashboard's cookie: it wants a bearer token
    assert secure_hub.client.get("/api/v1/experiments").status_code == 401


def test_sign_in_refuses_a_forged_form_an_unknown_token_and_a_sites_token(secure_hub: Hub) -> None:
    client = secure_hub.client
    client.get("/ui/login")
    r = client.post("/ui/login", data={"csrf_token": "forged", "token": ADMIN_TOKEN}, follow_redirects=False)
    assert r.status_code == 403 and "laulima_hub_session" not in r.headers.get("set-cookie", "")
    r = sign_in(secure_hub, "nobody-has-this-token")
    assert r.status_code == 401 and "unknown or has been revoked" in r.text
    r = sign_in(secure_hub, secure_hub.tokens["site-a"])
    assert r.status_code == 403 and "a site&#39;s token cannot sign in" in r.text
    assert client.get("/ui/", follow_redirects=False).status_code == 303


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/ui/", "/api/v1/experiments", "/ui\\@x"])
def test_sign_in_never_redirects_outside_the_dashboard(secure_hub: Hub, target: str) -> None:
    r = sign_in(secure_hub, ADMIN_TOKEN, next_url=target)
    assert r.status_code == 303 and r.headers["location"] == "/ui/"


def test_a_scientist_sees_their_own_and_shared_experiments_and_no_sites(secure_hub: Hub) -> None:
    alice, bob = secure_hub.person("alice"), secure_hub.person("bob")
    upload = secure_hub.client.put("/api/v1/blobs", content=update_bytes(make_weights()), headers=alice)
    assert upload.status_code == 201, upload.text
    mine = secure_hub.client.post(
        "/api/v1/experiments",
        json={"spec": spec(name="alice-study"), "initial_weights": upload.json()["digest"]},
        headers=alice,
    )
    assert mine.status_code == 201, mine.text
    other = secure_hub.submit(spec(name="operators-study"), make_weights())
    assert sign_in(secure_hub, token_of(alice)).status_code == 303
    page = secure_hub.client.get("/ui/").text
    assert "alice-study" in page and "operators-study" not in page
    assert 'id="sites"' not in page and "site-a" not in page
    assert secure_hub.client.get(f"/ui/experiments/{other['id']}").status_code == 404
    assert secure_hub.client.get(f"/ui/experiments/{other['id']}/model").status_code == 404
    # bob may read what alice shares with him, not cancel it
    secure_hub.client.post(f"/api/v1/experiments/{mine.json()['id']}/shares", json={"name": "bob"}, headers=alice)
    secure_hub.client.cookies.clear()
    assert sign_in(secure_hub, token_of(bob)).status_code == 303
    page = secure_hub.client.get(f"/ui/experiments/{mine.json()['id']}").text
    assert "alice-study" in page and "Cancel this experiment" not in page
    r = secure_hub.client.post(f"/ui/experiments/{mine.json()['id']}/cancel", data={"csrf_token": csrf_in(page)})
    assert r.status_code == 403
    assert secure_hub.experiment(mine.json()["id"])["status"] == "running"


def test_an_operator_sees_every_site_with_its_status_version_and_cohorts(secure_hub: Hub) -> None:
    r = secure_hub.client.put(
        "/api/v1/sites/self/report",
        json={"version": "9.8.7", "datasets": {"brains": 42}},
        headers=secure_hub.site("site-a"),
    )
    assert r.status_code == 204, r.text
    sign_in(secure_hub, ADMIN_TOKEN)
    page = secure_hub.client.get("/ui/").text
    row = re.search(r'<tr data-site="site-a">(.*?)</tr>', page, re.S)
    assert row and "online" in row.group(1) and "9.8.7" in row.group(1) and "brains: 42 cases" in row.group(1)
    assert "(3 of 3 online)" in page


def test_cancel_needs_the_sessions_csrf_token_and_a_same_origin_and_is_audited(secure_hub: Hub) -> None:
    exp = secure_hub.submit(spec(name="to-cancel"), make_weights())
    sign_in(secure_hub, ADMIN_TOKEN)
    page = secure_hub.client.get(f"/ui/experiments/{exp['id']}").text
    csrf = csrf_in(page)
    url = f"/ui/experiments/{exp['id']}/cancel"
    assert secure_hub.client.post(url).status_code == 403
    assert secure_hub.client.post(url, data={"csrf_token": "wrong"}).status_code == 403
    r = secure_hub.client.post(url, data={"csrf_token": csrf}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "cross-site request refused" in r.text
    assert secure_hub.experiment(exp["id"])["status"] == "running"
    origin = {"Origin": "https://testserver"}
    r = secure_hub.client.post(url, data={"csrf_token": csrf}, headers=origin, follow_redirects=False)
    assert r.status_code == 303
    assert secure_hub.experiment(exp["id"])["status"] == "cancelled"
    entries = [e for e in HubAuditLog(secure_hub.home).entries() if e.event == "cancelled"]
    assert entries and entries[-1].fields["actor"] == "admin"
    # deciding again is a clear 409 page, not a 500
    r = secure_hub.client.post(url, data={"csrf_token": csrf})
    assert r.status_code == 409 and "<h1>Not now</h1>" in r.text


def test_signing_out_ends_the_session_on_the_hub_and_revoking_the_token_ends_its_sessions(secure_hub: Hub) -> None:
    carol = secure_hub.person("carol")
    sign_in(secure_hub, token_of(carol))
    cookie = secure_hub.client.cookies.get("laulima_hub_session")
    page = secure_hub.client.get("/ui/")
    assert page.status_code == 200
    assert secure_hub.client.post("/ui/logout", data={}).status_code == 403  # no CSRF token: refused
    r = secure_hub.client.post("/ui/logout", data={"csrf_token": csrf_in(page.text)}, follow_redirects=False)
    assert r.status_code == 303
    secure_hub.client.cookies.set("laulima_hub_session", cookie or "", path="/ui")  # a copied cookie is dead too
    assert secure_hub.client.get("/ui/", follow_redirects=False).status_code == 303
    # signed in again, then the operator revokes carol's token: the next request is signed out
    secure_hub.client.cookies.clear()
    sign_in(secure_hub, token_of(carol))
    assert secure_hub.client.get("/ui/").status_code == 200
    tokens = secure_hub.get("/tokens")
    carol_id = next(t["id"] for t in tokens if t["name"] == "carol")
    assert secure_hub.client.post(f"/api/v1/tokens/{carol_id}/revoke", headers=secure_hub.admin).status_code == 200
    assert secure_hub.client.get("/ui/", follow_redirects=False).status_code == 303


def test_the_experiment_region_answers_304_until_a_round_adds_points(secure_hub: Hub) -> None:
    exp = secure_hub.submit(spec(name="live", rounds=2, sites=["site-a", "site-b"], min_sites=2), make_weights())
    secure_hub.wait_for(lambda: secure_hub.get(f"/experiments/{exp['id']}/rounds"), "round 1 to open")  # then still
    sign_in(secure_hub, ADMIN_TOKEN)
    live = f"/ui/experiments/{exp['id']}/live"
    page = secure_hub.client.get(f"/ui/experiments/{exp['id']}").text
    shown = re.search(r'id="experiment-live"[^>]*data-etag="([^"]+)"', page)
    assert shown, "the page's live region carries the version it shows"
    assert secure_hub.client.get(live, headers={"If-None-Match": html.unescape(shown.group(1))}).status_code == 304
    first = secure_hub.client.get(live)
    assert first.status_code == 200 and "No metrics yet" in first.text
    again = secure_hub.client.get(live, headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304
    run_round(secure_hub, exp["id"], {"site-a": 0.5, "site-b": 0.25})
    secure_hub.wait_for(lambda: secure_hub.experiment(exp["id"])["rounds_done"] == 1, "round 1 to close")
    changed = secure_hub.client.get(live, headers={"If-None-Match": first.headers["etag"]})
    assert changed.status_code == 200
    chart = re.search(r'<svg class="chart" id="chart-train-loss"[^>]*data-points="(\d+)"', changed.text)
    assert chart and chart.group(1) == "3"  # two sites and their mean
    points = re.findall(r'data-series="([^"]+)" data-x="1" data-y="([^"]+)"', changed.text)
    assert sorted(points) == [("mean (weighted by cases)", "0.375"), ("site-a", "0.5"), ("site-b", "0.25")]


def test_a_hostile_metric_name_is_text_on_the_page_never_markup(secure_hub: Hub) -> None:
    exp = secure_hub.submit(spec(name="hostile", sites=["site-a"]), make_weights())
    task = secure_hub.next_task("site-a")
    assert task is not None
    r = secure_hub.upload("site-a", task, update_bytes(make_weights(1), metrics={HOSTILE: 1.0}))
    assert r.status_code in (200, 201), r.text
    secure_hub.wait_status(exp["id"], "completed")
    sign_in(secure_hub, ADMIN_TOKEN)
    page = secure_hub.client.get(f"/ui/experiments/{exp['id']}").text
    assert HOSTILE not in page and "<img" not in page
    assert "&lt;img src=x onerror=" in page


def test_the_card_and_the_model_are_the_hubs_and_the_download_is_audited(secure_hub: Hub) -> None:
    exp = secure_hub.submit(spec(name="carded", rounds=1, sites=["site-a", "site-b"], min_sites=2), make_weights())
    run_round(secure_hub, exp["id"], {"site-a": 0.5, "site-b": 0.25})
    done = secure_hub.wait_status(exp["id"], "completed")
    sign_in(secure_hub, ADMIN_TOKEN)
    model = secure_hub.client.get(f"/ui/experiments/{exp['id']}/model")
    assert model.status_code == 200
    api_model = secure_hub.client.get(f"/api/v1/experiments/{exp['id']}/model", headers=secure_hub.admin)
    assert model.content == api_model.content
    card = secure_hub.client.get(f"/ui/experiments/{exp['id']}/card")
    assert card.status_code == 200 and "attachment" in card.headers["content-disposition"]
    body = json.loads(card.content)
    assert body["weights"]["sha256"] == done["global_digest"] and body["rounds"] == {"planned": 1, "done": 1}
    assert body["sites"] == ["site-a", "site-b"] and body["status"] == "completed"
    downloads = [e for e in HubAuditLog(secure_hub.home).entries() if e.event == "downloaded"]
    assert len(downloads) == 2 and all(e.fields["digest"] == done["global_digest"] for e in downloads)


def test_a_site_waiting_for_approval_and_a_refused_site_show_with_their_reasons(secure_hub: Hub) -> None:
    exp = secure_hub.submit(spec(name="held", sites=["site-a", "site-b", "site-c"], min_sites=1), make_weights())
    held, refused = secure_hub.next_task("site-a"), secure_hub.next_task("site-b")
    assert held is not None and refused is not None
    sign_in(secure_hub, ADMIN_TOKEN)
    live = f"/ui/experiments/{exp['id']}/live"
    before = secure_hub.client.get(live).headers["etag"]
    waiting = "job 1 waits for the site's administrator: manual approval"
    r = secure_hub.client.put(
        f"/api/v1/tasks/{held.id}/waiting", json={"reason": waiting}, headers=secure_hub.site("site-a")
    )
    assert r.status_code == 204, r.text
    r = secure_hub.client.post(
        f"/api/v1/tasks/{refused.id}/failure",
        json={"reason": "rejected: dataset 'brains' has 3 cases, policy min_cohort is 5", "kind": "rejected"},
        headers=secure_hub.site("site-b"),
    )
    assert r.status_code in (200, 204), r.text
    changed = secure_hub.client.get(live, headers={"If-None-Match": before})  # the open page learns of it
    assert changed.status_code == 200 and "min_cohort is 5" in changed.text
    for path in ("/ui/", f"/ui/experiments/{exp['id']}"):
        page = secure_hub.client.get(path).text
        assert "site-a" in page and waiting.replace("'", "&#39;") in page, path
        assert "min_cohort is 5" in page, path
