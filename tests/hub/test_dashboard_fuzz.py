"""Hostile requests to the hub's dashboard: whatever path, method, headers, cookie or body a
client sends, the answer is a page or a status below 500, nothing changes without the
session's CSRF token, and nothing of an experiment reaches a visitor without a session."""

from __future__ import annotations

import re
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hub.conftest import ADMIN_TOKEN, Hub, make_weights, spec

SECRET_NAME = "confidential-study"
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)
PATH_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=60)
"""What a client can put in a URL's path (control characters never leave one)."""
HEADER_TEXT = st.text(alphabet=string.printable.strip() + " ", max_size=80)
IDS = st.one_of(st.integers(-5, 5), st.just(2**63), st.just(10**30), PATH_TEXT.map(lambda t: t.replace("/", "")))
SUFFIXES = ["", "/live", "/live/actions", "/model", "/card", "/cancel", "/nothing", "/../../api/v1/experiments"]

paths = st.one_of(
    st.sampled_from(["/ui", "/ui/", "/ui/login", "/ui/logout", "/ui/live/overview", "/ui/static/laulima.css"]),
    st.builds(lambda i, s: f"/ui/experiments/{i}{s}", IDS, st.sampled_from(SUFFIXES)),
    st.builds(lambda t: "/ui/" + t, PATH_TEXT),
)
requests = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]),
        "path": paths,
        "query": st.dictionaries(st.sampled_from(["next", "model", "cancelled", "x"]), TEXT, max_size=2),
        "headers": st.dictionaries(
            st.sampled_from(["Origin", "Referer", "Content-Type", "If-None-Match", "Cookie", "Accept"]),
            HEADER_TEXT,
            max_size=4,
        ),
        "body": st.one_of(st.binary(max_size=300), TEXT.map(lambda t: f"csrf_token={t}&token={t}".encode())),
        "signed_in": st.booleans(),
    }
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests)
def test_no_request_breaks_the_dashboard_or_changes_anything_without_the_csrf_token(hub: Hub, request) -> None:
    if not getattr(hub, "_fuzz_ready", False):
        hub.submit(spec(name=SECRET_NAME), make_weights())
        form = hub.client.get("/ui/login").text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)  # type: ignore[union-attr]
        r = hub.client.post("/ui/login", data={"csrf_token": csrf, "token": ADMIN_TOKEN}, follow_redirects=False)
        hub._fuzz_session = r.cookies.get("laulima_hub_session")  # type: ignore[attr-defined]
        hub._fuzz_ready = True  # type: ignore[attr-defined]
    hub.client.cookies.clear()
    headers = dict(request["headers"])
    if request["signed_in"]:
        cookie = f"laulima_hub_session={hub._fuzz_session}"  # type: ignore[attr-defined]
        headers["Cookie"] = f"{cookie}; {headers['Cookie']}" if "Cookie" in headers else cookie
    try:
        response = hub.client.request(
            request["method"],
            request["path"],
            params=request["query"],
            headers=headers,
            content=request["body"],
            follow_redirects=False,
        )
    except UnicodeEncodeError:
        return  # the client itself cannot send such a header
    assert response.status_code < 500, (request, response.status_code, response.text[:300])
    if not request["signed_in"] and "laulima_hub_session" not in headers.get("Cookie", ""):
        assert SECRET_NAME not in response.text, request
    assert hub.experiment(1)["status"] == "running", f"a request without the session's CSRF token changed it: {request}"
