from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.integration.harness import Cli, Cluster, Server

# The longest files first (minutes each, most of it VMs under TCG): `--dist loadfile` hands files to the
# workers in collection order, and with these last the suite ended on one busy worker for ten minutes.
LONGEST_FIRST = ("test_vm_live_faults.py", "test_vm_live_failures.py", "test_vm_live.py", "test_vm_lifecycle.py",
                 "test_vm_exec.py", "test_vm_moves.py", "test_unprivileged_networks.py", "test_live_migration.py",
                 "test_docs_examples.py", "test_error_messages.py", "test_bounded_waits.py",
                 "test_snapshots_refresh.py", "test_vm_images.py", "test_vm_taps.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)) if item.path.parent.name ==
               "integration" else len(LONGEST_FIRST))  # stable: the rest as collected
    reasons = []
    if os.geteuid() != 0:
        reasons.append("integration tests run containers: they need root")
    if shutil.which("lxc-start") is None:
        reasons.append("LXC is not installed (make install)")
    if reasons:
        for item in items:
            if "integration" in str(item.path):
                item.add_marker(pytest.mark.skip(reason="; ".join(reasons)))


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def s1(cluster: Cluster) -> Server:
    return cluster.server("s1", "127.0.0.1")


@pytest.fixture
def s2(cluster: Cluster) -> Server:
    return cluster.server("s2", "127.0.0.2")


@pytest.fixture
def two(cluster: Cluster, s1: Server, s2: Server) -> Cli:
    """A client trusted on both servers, as remotes 's1' and 's2'."""
    client = cluster.cli()
    client.trust(s1, "s1")
    client.trust(s2, "s2")
    return client


@pytest.fixture
def cli(cluster: Cluster, s1: Server) -> Cli:
    """A client that trusts s1 as remote 's1' and whose default remote is s1's unix socket."""
    client = cluster.cli(s1)
    client.trust(s1, "s1")
    return client
