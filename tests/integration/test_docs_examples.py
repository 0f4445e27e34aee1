"""Every example of docs/cli.md runs against real servers (issue 17, item 7). The convention, written at the
top of docs/cli.md: a fenced ```sh block is run; each line one command, in order, by /bin/sh, with `stapes`
on PATH and a client that trusts s1 (the default remote) and s2, both with the busybox image; each must exit
0, and one that ends with `# fails` must fail with a one-line `Error: ...`. The blocks of a `##` section run in
order; the sections share two servers (emptied of instances in between)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.harness import BIN, Cli, Cluster

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
FAILS = re.compile(r"\s+#\s*fails\b.*$")


@dataclass(frozen=True)
class Example:
    line: int  # in docs/cli.md
    command: str
    fails: bool


def sections(text: str) -> dict[str, list[Example]]:
    """`## Section` -> its runnable examples, in order (pure)."""
    found: dict[str, list[Example]] = {}
    section = ""
    in_block = False
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if in_block:
            if line.startswith("```"):
                in_block = False
            elif line and not line.startswith("#"):
                fails = FAILS.search(line) is not None
                found.setdefault(section, []).append(Example(number, FAILS.sub("", line), fails))
            continue
        if raw.startswith("## "):
            section = raw[3:].strip()
        elif line == "```sh":
            in_block = True
    return found


def test_the_doc_reader() -> None:
    text = "## A\n```sh\nstapes list\n# a comment\nstapes start x   # fails: no such\n```\n```\nnot run\n```\n## B\n"
    assert sections(text) == {"A": [Example(3, "stapes list", False), Example(5, "stapes start x", True)]}


SECTIONS = sections(DOC.read_text())


@dataclass
class Place:
    cluster: Cluster
    cli: Cli
    env: dict[str, str]
    client_config: Path  # the client's configuration as every section starts with it (remotes s1, s2)


@pytest.fixture(scope="module")
def place() -> Iterator[Place]:
    """One pair of servers for every section (starting servers is most of the time): each section gets them
    back with no instances and s1 the default remote."""
    cluster = Cluster()
    try:
        s1 = cluster.server("s1", "127.0.0.1")
        s2 = cluster.server("s2", "127.0.0.2")
        cli = cluster.cli(s1)
        cli.trust(s1, "s1")
        cli.trust(s2, "s2")
        env = {**cli.env(), "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}", "EDITOR": "true"}
        saved = cluster.root / "client-at-start"
        shutil.copytree(cli.conf_dir, saved, symlinks=True)
        yield Place(cluster, cli, env, saved)
    finally:
        cluster.close()


def _reset(place: Place) -> None:
    """Each section starts from the same client (a section may rename, re-point or remove remotes: 'Remotes
    and trust' does) and servers without instances."""
    shutil.rmtree(place.cli.conf_dir)
    shutil.copytree(place.client_config, place.cli.conf_dir, symlinks=True)
    for server in place.cluster.servers:
        for name, _ in server.instances():
            place.cli.run("delete", f"{server.name}:{name}", "--force")


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_the_examples_of_the_section_run(section: str, place: Place, tmp_path: Path) -> None:
    _reset(place)
    for example in SECTIONS[section]:
        result = subprocess.run(["/bin/sh", "-c", example.command], env=place.env, cwd=tmp_path, capture_output=True,
                                text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
        where = f"docs/cli.md:{example.line}: {example.command}"
        if example.fails:
            assert result.returncode != 0, f"{where} should fail:\n{result.stdout}"
            assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, \
                f"{where} should fail with one line 'Error: ...':\n{result.stderr}"
        else:
            assert result.returncode == 0, f"{where} failed ({result.returncode}):\n{result.stderr}"
