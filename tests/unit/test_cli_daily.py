"""The command line's pure pieces: argv normalisation, alias expansion, list filters, columns and formats."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from stapes.api.errors import BadRequest
from stapes.cli import listing
from stapes.cli.argv import expand_alias, normalise
from stapes.cli.devices import split_settings
from stapes.cli.main import cli, prepare
from stapes.cli.remote import _https_url
from stapes.client.config import ClientConfig

# argv normalisation


@pytest.mark.parametrize(("given", "expected"), [
    (["list", "s1:", "--project", "staging"], ["--project", "staging", "list", "s1:"]),
    (["--project", "staging", "list"], ["--project", "staging", "list"]),
    (["list", "--project=staging", "--debug"], ["--project=staging", "--debug", "list"]),
    (["config", "trust", "add", "me", "-q"], ["-q", "config", "trust", "add", "me"]),
    # a command's own -q stays its own
    (["launch", "busybox", "c1", "-q"], ["launch", "busybox", "c1", "-q"]),
    (["move", "c1", "s2:", "-q", "--debug"], ["--debug", "move", "c1", "s2:", "-q"]),
    # nothing after -- moves
    (["exec", "c1", "--", "ls", "--project", "x", "-q"], ["exec", "c1", "--", "ls", "--project", "x", "-q"]),
    (["exec", "c1", "--verbose", "--", "ls", "-v"], ["--verbose", "exec", "c1", "--", "ls", "-v"]),
    (["version", "--force-local"], ["--force-local", "version"]),
])
def test_global_options_go_to_the_front(given: list[str], expected: list[str]) -> None:
    assert normalise(given, cli) == expected


def test_a_global_option_without_its_value_is_refused() -> None:
    with pytest.raises(BadRequest, match="needs a value"):
        normalise(["list", "--project"], cli)


def test_global_options_parse_after_the_command() -> None:
    runner = CliRunner()
    result = runner.invoke(cli, normalise(["completion", "bash", "--debug", "-q"], cli))
    assert result.exit_code == 0, result.output
    assert "_STAPES_COMPLETE" in result.output


# aliases


def test_alias_appends_the_remaining_words() -> None:
    assert expand_alias({"ls": "list -c ns"}, ["ls", "s1:"]) == ["list", "-c", "ns", "s1:"]


def test_alias_args_and_numbered_args() -> None:
    aliases = {"login": "exec @ARGS@ -- sh -l", "logs": "info @ARG1@ --show-log", "cp2": "copy @ARG2@ @ARG1@"}
    assert expand_alias(aliases, ["login", "c1"]) == ["exec", "c1", "--", "sh", "-l"]
    assert expand_alias(aliases, ["logs", "c1", "-x"]) == ["info", "c1", "--show-log", "-x"]
    assert expand_alias(aliases, ["cp2", "a", "b", "c"]) == ["copy", "b", "a", "c"]


def test_alias_numbered_arg_out_of_range() -> None:
    with pytest.raises(BadRequest, match="outside the given number"):
        expand_alias({"logs": "info @ARG2@"}, ["logs", "c1"])


def test_the_longest_alias_wins_and_leading_options_stay() -> None:
    aliases = {"my": "list", "my web": "list web -c n"}
    assert expand_alias(aliases, ["--project", "p", "my", "web", "x"]) == ["--project", "p", "list", "web", "-c",
                                                                           "n", "x"]
    assert expand_alias(aliases, ["my", "db"]) == ["list", "db"]


def test_no_alias_and_the_builtin_shell() -> None:
    assert expand_alias({"ls": "list"}, ["list"]) is None
    assert expand_alias({}, []) is None
    assert expand_alias({}, ["shell", "c1"]) == ["exec", "c1", "--", "su", "-l"]


def test_alias_quoting_follows_the_shell() -> None:
    assert expand_alias({"hi": "exec @ARGS@ -- sh -c 'echo hi there'"}, ["hi", "c1"]) == [
        "exec", "c1", "--", "sh", "-c", "echo hi there"]


def test_prepare_expands_then_normalises() -> None:
    assert prepare(["ls", "--project", "p"], {"ls": "list -c ns"}) == ["--project", "p", "list", "-c", "ns"]


def test_aliases_survive_the_config_file(tmp_path: object) -> None:
    from pathlib import Path
    directory = Path(str(tmp_path))
    conf = ClientConfig.load(directory)
    conf.aliases["ls"] = "list -c ns"
    conf.save()
    assert ClientConfig.load(directory).aliases == {"ls": "list -c ns"}


def test_rename_remote_moves_its_certificate(tmp_path: object) -> None:
    from pathlib import Path

    from stapes.client.config import Remote
    directory = Path(str(tmp_path))
    conf = ClientConfig.load(directory)
    conf.remotes["s1"] = Remote("s1", "https://127.0.0.1:8443")
    conf.default_remote = "s1"
    conf.server_cert("s1").parent.mkdir(parents=True)
    conf.server_cert("s1").write_text("PEM")
    conf.rename_remote("s1", "lab")
    assert conf.default_remote == "lab" and "s1" not in conf.remotes and conf.remotes["lab"].name == "lab"
    assert conf.server_cert("lab").read_text() == "PEM" and not conf.server_cert("s1").exists()
    with pytest.raises(BadRequest):
        conf.rename_remote("local", "x")
    with pytest.raises(BadRequest):
        conf.rename_remote("lab", "local")


@pytest.mark.parametrize(("given", "expected"), [
    ("10.0.0.5", "https://10.0.0.5:8443"), ("10.0.0.5:9443", "https://10.0.0.5:9443"),
    ("https://h.example/", "https://h.example:8443"), ("::1", "https://[::1]:8443"),
    ("[::1]:9000", "https://[::1]:9000"),
])
def test_remote_urls(given: str, expected: str) -> None:
    assert _https_url(given) == expected


def test_device_settings_forms() -> None:
    assert split_settings(("source", "/srv")) == {"source": "/srv"}
    assert split_settings(("a=1", "b=2")) == {"a": "1", "b": "2"}
    with pytest.raises(BadRequest):
        split_settings(("a", "b", "c"))


# list


def _instance(name: str, status: str = "Running", **extra: object) -> dict[str, object]:
    base: dict[str, object] = {
        "name": name, "status": status, "type": "container", "architecture": "x86_64", "project": "default",
        "description": "", "ephemeral": False, "profiles": ["default"], "config": {}, "devices": {},
        "expanded_config": {}, "expanded_devices": {"root": {"type": "disk", "path": "/", "pool": "default"}},
        "created_at": "2026-12-01T10:00:00Z", "last_used_at": "0001-01-01T00:00:00Z", "location": "none",
        "snapshots": [],
        "state": {"pid": 42, "processes": 3, "memory": {"usage": 50 * 2**20}, "cpu": {"usage": 7_500_000_000},
                  "disk": {"root": {"usage": 3 * 2**30}},
                  "network": {"eth0": {"type": "broadcast", "addresses": [
                      {"family": "inet", "address": "10.0.0.5", "scope": "global"},
                      {"family": "inet6", "address": "fe80::1", "scope": "link"}]}}},
    }
    base.update(extra)
    return base


def test_filters() -> None:
    web = _instance("web1", expanded_config={"user.role": "web", "image.os": "Debian"})
    db = _instance("db1", "Stopped", expanded_config={"user.role": "db"})
    assert listing.matches(web, ["status=running"]) and not listing.matches(db, ["status=running"])
    assert listing.matches(db, ["state=STOPPED"]) and listing.matches(db, ["status=running,stopped"])
    assert listing.matches(web, ["user.role=web"]) and not listing.matches(db, ["user.role=web"])
    assert listing.matches(web, ["u.role=web"])  # the namespace abbreviated
    assert listing.matches(web, ["image.os=debian"]) and listing.matches(web, ["image.os=Deb.*"])
    assert listing.matches(web, ["type=container"]) and not listing.matches(web, ["type=virtual-machine"])
    assert listing.matches(web, ["we"]) and not listing.matches(db, ["we"])  # a name prefix
    assert listing.matches(web, [".*b1$"]) and listing.matches(db, [".*b1$"])  # a regular expression
    assert not listing.matches(web, ["eb"])
    assert listing.matches(web, ["ipv4=10.0.0.0/24"]) and not listing.matches(web, ["ipv4=10.1.0.0/24"])
    assert listing.matches(web, ["ipv4=10.0.0.5", "status=running", "user.role=web"])
    assert not listing.matches(web, ["status=running", "user.role=db"])
    assert not listing.matches(web, ["user.missing=x"])


def test_split_target() -> None:
    assert listing.split_target(("s1:", "status=running"), {"s1", "local"}) == ("s1", ["status=running"])
    assert listing.split_target(("s1:web",), {"s1"}) == ("s1", ["web"])
    assert listing.split_target(("volatile.eth0.hwaddr=10:66:.*",), {"s1"}) == (None, ["volatile.eth0.hwaddr=10:66:.*"])
    assert listing.split_target((), {"s1"}) == (None, [])
    with pytest.raises(BadRequest, match="Remote 'nosuch' does not exist"):  # never read as a filter
        listing.split_target(("nosuch:",), {"s1"})


def test_columns_shorthand_long_names_and_keys() -> None:
    headers = [c.header for c in listing.parse_columns("ns,4DlumMtLNp")]
    assert headers == ["NAME", "STATE", "IPV4", "DISK USAGE", "LAST USED AT", "CPU USAGE", "MEMORY USAGE",
                       "MEMORY USAGE%", "TYPE", "LOCATION", "PROCESSES", "PID"]
    assert [c.header for c in listing.parse_columns("name,state,ipv4")] == ["NAME", "STATE", "IPV4"]
    assert [c.header for c in listing.parse_columns("n,user.role:ROLE,devices:root.pool")] == [
        "NAME", "ROLE", "root.pool"]
    with pytest.raises(BadRequest, match="Unknown column shorthand char 'z'"):
        listing.parse_columns("nz")
    with pytest.raises(BadRequest, match="Empty column"):
        listing.parse_columns("n,,s")


def test_cells_in_units_people_read() -> None:
    web = _instance("web1", ephemeral=True, config={"user.role": "webserver"},
                    expanded_config={"limits.memory": "100MiB", "user.role": "webserver"})
    columns = listing.parse_columns("nsmMDutNp4,user.role:R:3,devices:root.pool,R")
    assert listing.rows([web], columns, remote="s1") == [[
        "web1", "RUNNING", "50.00MiB", "50.0%", "3.00GiB", "7s", "CONTAINER (EPHEMERAL)", "3", "42",
        "10.0.0.5 (eth0)", "web", "default", "s1"]]
    assert listing.rows([web], listing.parse_columns("mD"), raw=True) == [[str(50 * 2**20), str(3 * 2**30)]]
    stopped = _instance("db1", "Stopped")
    assert listing.rows([stopped], listing.parse_columns("mupN4l")) == [["", "", "", "", "", ""]]


def test_default_columns_drop_location_without_a_cluster() -> None:
    assert listing.drop_unlocated(listing.DEFAULT_COLUMNS, [_instance("a")]) == "ns46tS"
    assert listing.drop_unlocated(listing.DEFAULT_COLUMNS, [_instance("a", location="m1")]) == "ns46tSL"
    assert listing.columns_for(None, all_projects=True, fast=False) == "ens46tSL"
    assert listing.columns_for(None, all_projects=False, fast=True) == "nsacPt"
    with pytest.raises(BadRequest):
        listing.columns_for("ns", all_projects=False, fast=True)


def test_formats(capsys: pytest.CaptureFixture[str]) -> None:
    from stapes.cli import render
    render.table(["NAME", "STATE"], [["a", "RUNNING"]], "csv")
    assert capsys.readouterr().out == "a,RUNNING\n"
    render.table(["NAME", "STATE"], [["a", "RUNNING"]], "csv,header")
    assert capsys.readouterr().out == "NAME,STATE\na,RUNNING\n"
    render.table(["NAME", "STATE"], [["a", "RUNNING"]], "table,noheader")
    out = capsys.readouterr().out
    assert "a" in out and "NAME" not in out
    render.table(["NAME", "STATE"], [["a", "RUNNING"]], "compact")
    assert "NAME" in capsys.readouterr().out
    import click
    with pytest.raises(click.BadParameter):
        render.split_format("csv,sideways")
    with pytest.raises(click.BadParameter):
        render.split_format("xml")
