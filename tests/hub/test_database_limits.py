"""What one database stores and another refuses is refused at the door, on every backend.

SQLite stores a NUL character in text and any 64-bit integer; PostgreSQL refuses both (text
cannot hold NUL, ids are 32-bit), which would turn a hostile request into a 500 there. The
hub refuses them with a 4xx naming the field, whichever database it runs on
(``pytest --hub-backend=postgres-s3`` runs this against PostgreSQL).
"""

from __future__ import annotations

import pytest

from .conftest import Hub, make_weights, spec


def test_text_with_a_nul_character_is_refused_wherever_it_is(hub: Hub):
    exp = hub.submit(spec(sites=["site-a"]), make_weights(0))
    task = hub.next_task("site-a")
    assert task is not None
    body = {"kind": "error", "reason": "out of\x00memory"}
    failure = hub.client.post(hub.url(f"/tasks/{task.id}/failure"), json=body, headers=hub.site("site-a"))
    assert failure.status_code == 422 and "NUL" in failure.json()["detail"] and "reason" in failure.json()["detail"]
    token = hub.client.post(hub.url("/tokens"), json={"name": "eve\x00", "role": "scientist"}, headers=hub.admin)
    assert token.status_code == 422 and "name" in token.json()["detail"]
    nested = hub.client.post(
        hub.url("/experiments"),
        json={"spec": spec(config={"note": "a\x00b"}), "initial_weights": exp["global_digest"]},
        headers=hub.admin,
    )
    assert nested.status_code == 422 and "spec.config.note" in nested.json()["detail"]


@pytest.mark.parametrize("row_id", [2**31, 2**40, 2**63])
def test_ids_beyond_the_database_s_integers_are_refused(hub: Hub, row_id: int):
    for path in (f"/experiments/{row_id}", f"/experiments/{row_id}/rounds", f"/audit?experiment={row_id}"):
        r = hub.client.get(hub.url(path), headers=hub.admin)
        assert r.status_code == 422, (path, r.status_code, r.text)
    assert hub.client.post(hub.url(f"/tokens/{row_id}/revoke"), headers=hub.admin).status_code == 422


def test_a_refusal_may_quote_the_nul_it_refuses(hub: Hub):
    """The error body names what was wrong, NUL included (JSON escapes it): still a 422, not a 500."""
    r = hub.client.post(hub.url("/tokens"), json={"name\x00": None}, headers=hub.admin)
    assert r.status_code == 422, r.text
    shares = hub.url(f"/tasks/{'0' * 32}/secagg/shares")  # found by the OpenAPI fuzzing: a 500 before
    r = hub.client.post(shares, json={"ciphertexts": {"\x00": None}}, headers=hub.site("site-a"))
    assert r.status_code == 422, r.text
