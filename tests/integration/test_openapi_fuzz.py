"""The REST API fuzzed from its published description (docs/openapi.yaml) with schemathesis: no request may
crash the daemon, answer 5xx, give an error without a message, or write outside the state directory.

Bounded: a few examples per operation. Left out of the fuzzing, on purpose: changing the server's own
listen address (PUT/PATCH /1.0), creating storage pools (their source is a host path the administrator
chooses), and creating or reconfiguring networks (each makes a bridge, routes and firewall rules on the host:
their checks are unit-tested and tried in test_unprivileged_networks). Migration requests are kept, but their
peer addresses are pinned to a closed loopback port so nothing leaves the machine.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.integration.harness import Cli, Server

SPEC = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
EXAMPLES = 25
NOT_FUZZED = {("PUT", "/1.0"), ("PATCH", "/1.0"), ("POST", "/1.0/storage-pools"), ("POST", "/1.0/networks"),
              ("PUT", "/1.0/networks/{entity}"), ("PATCH", "/1.0/networks/{entity}")}
NOWHERE = "https://127.0.0.1:1/1.0/operations/nowhere"


def _keep_on_loopback(body: Any) -> Any:
    """A migration peer's address from the fuzzer would be dialed: point it at a closed loopback port."""
    if isinstance(body, dict):
        for key in ("source", "target"):
            if isinstance(body.get(key), dict) and "operation" in body[key]:
                body[key]["operation"] = NOWHERE
    return body


def _tree(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def test_fuzzed_requests_never_break_the_server(s1: Server, cli: Cli) -> None:
    cli.run("init", "busybox", "c1", "-q")
    outside = s1.state_dir.parent
    before = {p for p in _tree(outside) if not p.startswith(str(s1.state_dir))}
    session = requests.Session()
    session.cert = (str(cli.conf_dir / "client.crt"), str(cli.conf_dir / "client.key"))
    session.verify = False
    schema = schemathesis.openapi.from_path(SPEC)
    failures: list[str] = []
    sent: list[int] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) in NOT_FUZZED:
            continue
        operations += 1

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case: Any) -> None:
            case.body = _keep_on_loopback(case.body)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                response = case.call(base_url=s1.url, session=session, timeout=30, verify=False)
            sent.append(response.status_code)
            where = f"{case.method} {case.formatted_path} {str(case.body)[:200]}"
            if response.status_code >= 500:
                failures.append(f"{response.status_code} for {where}: {response.text[:300]}")
                return
            try:
                envelope = response.json()
            except ValueError:
                failures.append(f"not JSON for {where}: {response.text[:200]}")
                return
            if envelope.get("type") == "error" and not envelope.get("error"):
                failures.append(f"an error without a message for {where}")

        fuzz()
    assert operations >= 40
    assert len(sent) >= operations * 5, f"only {len(sent)} requests were sent"
    assert len({code for code in sent if 400 <= code < 500}) >= 2  # refusals were exercised, not only successes
    assert not failures, "\n".join(failures[:20])
    assert s1.proc is not None and s1.proc.poll() is None, "the daemon died"
    after = {p for p in _tree(outside) if not p.startswith(str(s1.state_dir))}
    assert after - before <= {p for p in after if "/client" in p or "/root-" in p}, after - before
    assert "c1" in [i["name"] for i in cli.json("list")]
