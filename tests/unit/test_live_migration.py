"""Live migration's pure parts: the move plan, the pre-copy rule on CRIU's own statistics, CRIU's errors and
version, the live header exchange."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stapes.api.errors import BadRequest
from stapes.cli.instance import live_summary
from stapes.client.move import Plan, Situation, plan, precopy_lines
from stapes.server.idmap import IdRange
from stapes.server.instances.criu import parse_dump_stats, parse_version
from stapes.server.instances.driver import MemoryRound
from stapes.server.instances.idmapped import map_lines
from stapes.server.instances.lxc import criu_errors
from stapes.server.instances.lxc_live import check_state_links
from stapes.server.migration import migrate_pb2 as pb
from stapes.server.migration import protocol
from stapes.server.migration.policy import PrecopySettings, another_precopy_round

DATA = Path(__file__).parent.parent / "data" / "criu"


def _situation(**changes: object) -> Situation:
    base = {"move": True, "running": False, "stateless": False, "same_server": False, "same_place": False,
            "same_name": True, "same_project": True}
    base.update(changes)
    return Situation(**base)  # type: ignore[arg-type]


def test_the_move_plan() -> None:
    assert plan(_situation()) == Plan(delete_source=True)
    assert plan(_situation(move=False)) == Plan()
    # A running container moves live; a copy keeps the source running.
    assert plan(_situation(running=True)) == Plan(live=True, delete_source=True)
    assert plan(_situation(running=True, move=False)) == Plan(live=True, keep_running=True)
    # --stateless: stopped first, started after.
    assert plan(_situation(running=True, stateless=True)) == Plan(stop_first=True, delete_source=True)
    # A VM moves live only with migration.stateful; otherwise it is refused, saying the three ways on.
    with pytest.raises(BadRequest, match="stop it first, set migration.stateful=true .* add --stateless"):
        plan(_situation(running=True, instance_type="virtual-machine"))
    assert plan(_situation(running=True, instance_type="virtual-machine", stateless=True)) == Plan(
        stop_first=True, delete_source=True)
    assert plan(_situation(running=True, instance_type="virtual-machine", stateful=True)).live
    # Within one server: a rename, or another pool through a temporary name; never live.
    assert plan(_situation(same_server=True, same_place=True, same_name=False)) == Plan(rename_only=True)
    with pytest.raises(BadRequest, match="already there"):
        plan(_situation(same_server=True, same_place=True))
    assert plan(_situation(same_server=True)) == Plan(delete_source=True, through_landing=True)
    with pytest.raises(BadRequest, match="--stateless"):
        plan(_situation(same_server=True, running=True))
    assert plan(_situation(same_server=True, running=True, stateless=True)) == Plan(
        stop_first=True, delete_source=True, through_landing=True)


def test_dump_statistics_recorded_from_criu() -> None:
    stats = parse_dump_stats((DATA / "stats-dump-privileged").read_bytes())
    assert stats.pages_written == 84 and stats.pages_skipped_parent == 0 and stats.pages_scanned == 119
    assert 0 < stats.frozen_time < 10**6  # microseconds: a busybox container freezes for about 0.1 s
    first = MemoryRound(stats.pages_written, stats.pages_skipped_parent)
    assert first.synced_percent == 0.0  # a first (or only) dump: nothing was on the target before
    unprivileged = parse_dump_stats((DATA / "stats-dump-unprivileged").read_bytes())
    assert unprivileged.pages_written == 83
    with pytest.raises(ValueError, match="not a CRIU stats image"):
        parse_dump_stats(b"\x00" * 32)
    with pytest.raises(ValueError):
        parse_dump_stats((DATA / "stats-dump-privileged").read_bytes()[:20])


def test_the_precopy_rule() -> None:
    on = PrecopySettings.from_config({"migration.incremental.memory": "true"})
    assert (on.goal, on.iterations) == (70, 10)
    stats = parse_dump_stats((DATA / "stats-dump-privileged").read_bytes())
    first = MemoryRound(stats.pages_written, stats.pages_skipped_parent)
    assert another_precopy_round(on, 0, None)  # the first round always runs
    assert another_precopy_round(on, 1, first.synced_percent)  # 0 % synced: go on
    later = MemoryRound(pages_written=10, pages_skipped=90)
    assert later.synced_percent == 90.0
    assert not another_precopy_round(on, 2, later.synced_percent)  # the goal is reached: final dump
    assert not another_precopy_round(on, 10, 1.0)  # the round limit
    strict = PrecopySettings.from_config({"migration.incremental.memory": "true",
                                          "migration.incremental.memory.goal": "95",
                                          "migration.incremental.memory.iterations": "3"})
    assert another_precopy_round(strict, 2, later.synced_percent) and not another_precopy_round(strict, 3, 0.0)
    assert not another_precopy_round(PrecopySettings.from_config({}), 0, None)  # off by default


def test_criu_errors_and_version() -> None:
    log = ("(00.039637) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n"
           "Error (criu/util.c:642): execvp(\"iptables-restore\", ...) failed: No such file or directory\n"
           "(00.090587) Error (criu/cr-dump.c:1528): A session leader of 17399(23) is outside of its pid namespace\n"
           "(00.106986) Error (criu/cr-dump.c:1975): Dumping FAILED.\n")
    assert criu_errors(log) == "A session leader of 17399(23) is outside of its pid namespace / Dumping FAILED."
    assert criu_errors("(0.1) Info nothing wrong\n") == ""
    assert parse_version("Version: 4.2.1\n") == (4, 2, 1)
    assert parse_version("Version: 3.17\nGitID: x\n") == (3, 17)
    assert parse_version("criu: unrecognized option") is None


def test_idmap_lines_for_the_namespace() -> None:
    ranges = [IdRange(uid=True, gid=False, host=1000000, inside=0, size=65536),
              IdRange(uid=False, gid=True, host=2000000, inside=0, size=65536)]
    assert map_lines(ranges, uid=True) == "0 1000000 65536\n"
    assert map_lines(ranges, uid=False) == "0 2000000 65536\n"


def test_the_live_header_exchange() -> None:
    offer = protocol.offer_header(["tar-stream"], refresh=False, total_bytes=10, live=True)
    assert protocol.live_offered(offer) and offer.criu == pb.CRIU_RSYNC
    protocol.check_live(offer, requested=True)
    with pytest.raises(protocol.ProtocolError, match="did not ask"):
        protocol.check_live(offer, requested=False)
    stopped = protocol.offer_header(["tar-stream"], refresh=False, total_bytes=10)
    assert not protocol.live_offered(stopped) and not stopped.HasField("criu")
    with pytest.raises(protocol.ProtocolError, match="asked"):
        protocol.check_live(stopped, requested=True)
    answer, transport = protocol.answer_header(offer, ["tar-stream"])
    assert transport == "tar-stream" and protocol.live_accepted(answer)
    assert not protocol.live_accepted(protocol.answer_header(stopped, ["tar-stream"])[0])
    # An Incus sender's live protocol (CRIU_RSYNC without Stapes transports) is refused with what to do.
    incus = pb.MigrationHeader(fs=pb.RSYNC, criu=pb.CRIU_RSYNC)
    with pytest.raises(protocol.ProtocolError, match="--stateless"):
        protocol.check_live(incus, requested=True)


def test_a_received_state_may_link_only_to_earlier_rounds(tmp_path: Path) -> None:
    for name in ("predump-1", "predump-2", "final"):
        (tmp_path / name).mkdir()
    (tmp_path / "predump-2" / "parent").symlink_to("../predump-1")
    (tmp_path / "final" / "parent").symlink_to("../predump-2")
    check_state_links(tmp_path)  # CRIU's own layout
    for where, target in (("final/parent", "/etc"), ("predump-1/parent", "../predump-2"),
                          ("final/pages-1.img", "/etc/shadow"), ("final/parent", "../final")):
        link = tmp_path / where
        saved = os.readlink(link) if link.is_symlink() else None
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        with pytest.raises(protocol.ProtocolError, match="link"):
            check_state_links(tmp_path)
        link.unlink()
        if saved is not None:
            link.symlink_to(saved)


def test_what_the_cli_says_of_pre_copy() -> None:
    assert precopy_lines({}) == []
    assert precopy_lines({"precopy": "migration.incremental.memory is set, but no"}) == [
        "Pre-copy: migration.incremental.memory is set, but no"]
    rounds = [{"round": 1, "pages_written": 100, "pages_skipped": 0, "synced_percent": 0.0, "bytes": 2**20,
               "seconds": 0.5}]
    assert precopy_lines({"precopy_rounds": rounds}) == [
        "Pre-copy round 1: 100 pages written, 0 unchanged (0.0% in sync), 1.0 MiB in 0.50s"]


def test_the_server_info_line() -> None:
    assert live_summary({}) == "-"
    assert live_summary({"available": False, "reason": "CRIU is not installed"}) == "no: CRIU is not installed"
    assert live_summary({"available": True, "version": "4.2.1", "incremental_memory": False}) == (
        "yes (CRIU 4.2.1, no pre-copy (no soft-dirty tracking))")


def test_a_lazy_offer_says_so() -> None:
    offer = protocol.offer_header(["tar-stream"], refresh=False, total_bytes=1, live=True, lazy=True)
    assert offer.stapesLazy and protocol.live_offered(offer)
    assert not protocol.offer_header(["tar-stream"], refresh=False, total_bytes=1, live=True).stapesLazy


def test_the_handover_is_agreed_by_both_ends() -> None:
    """Two copies never run: a Stapes target holds its restored copy until the source gave its own up; with a
    peer that does not know the field (an older Stapes), the old behaviour stays; lazy pages never hold."""
    offer = protocol.offer_header(["tar-stream"], refresh=False, total_bytes=1, live=True)
    answer, _ = protocol.answer_header(offer, ["tar-stream"])
    assert offer.stapesHandover and protocol.handed_over(offer, answer)
    older_target = pb.MigrationHeader()
    older_target.CopyFrom(answer)
    older_target.ClearField("stapesHandover")
    assert not protocol.handed_over(offer, older_target)
    older_source = pb.MigrationHeader()
    older_source.CopyFrom(offer)
    older_source.ClearField("stapesHandover")
    assert not protocol.handed_over(older_source, protocol.answer_header(older_source, ["tar-stream"])[0])
    lazy = protocol.offer_header(["tar-stream"], refresh=False, total_bytes=1, live=True, lazy=True)
    assert not protocol.handed_over(lazy, protocol.answer_header(lazy, ["tar-stream"])[0])
    stopped = protocol.offer_header(["tar-stream"], refresh=False, total_bytes=1)
    assert not stopped.stapesHandover
