"""Ownership and sharing on a real hub with mutual TLS, through the client and the `laulima` command."""

from __future__ import annotations

import pytest
from click.testing import Result
from typer.testing import CliRunner

from laulima.cli import app
from laulima.client import Client
from laulima.core.weights import to_safetensors
from laulima.errors import Forbidden, NotFound

from .conftest import TLSHub
from .test_authorization import SPEC, _weights

runner = CliRunner()


def test_a_scientist_shares_an_experiment_from_the_command_line(tls_hub: TLSHub):
    op = tls_hub.operator()
    assert op.post("/sites", json={"name": "site-a"}).status_code == 201
    tokens = {n: op.post("/tokens", json={"name": n, "role": "scientist"}).json()["token"] for n in ("alice", "bob")}
    url = f"https://127.0.0.1:{tls_hub.settings.port}"
    alice = Client(url, tokens["alice"], ca_file=tls_hub.ca.ca_file)
    bob = Client(url, tokens["bob"], ca_file=tls_hub.ca.ca_file)
    try:
        exp = alice.submit({**SPEC, "sites": ["site-a"], "min_sites": 1}, to_safetensors(_weights(0, 1000)))
        assert exp.owner == "alice" and [e.id for e in bob.experiments()] == []
        with pytest.raises(NotFound, match=f"no experiment with id {exp.id}"):
            bob.experiment(exp.id)

        def laulima(token: str, *args: str) -> Result:
            env = {"COLUMNS": "200", "LAULIMA_CA_FILE": str(tls_hub.ca.ca_file)}
            return runner.invoke(app, [*args, "--hub", url, "--token", token], env=env)

        done = laulima(tokens["alice"], "experiment", "share", str(exp.id), "bob")
        assert done.exit_code == 0 and "shared with bob" in done.output, done.output
        assert bob.experiment(exp.id).shared_with == ["bob"] and [e.id for e in bob.experiments()] == [exp.id]
        refused = laulima(tokens["bob"], "experiment", "unshare", str(exp.id), "bob")
        assert isinstance(refused.exception, Forbidden)  # `laulima` prints it and exits 4
        assert "only its owner or an operator may change the sharing of it" in str(refused.exception)
        done = laulima(tokens["alice"], "experiment", "unshare", str(exp.id), "bob")
        assert done.exit_code == 0 and "shared with nobody else" in done.output, done.output
        with pytest.raises(NotFound):
            bob.rounds(exp.id)
    finally:
        alice.close()
        bob.close()
