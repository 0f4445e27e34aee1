from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from stapes.server.idmap import IdRange, check_ranges, unshift
from stapes.server.migration import migrate_pb2 as pb
from stapes.server.migration import protocol

INCUS = [IdRange(uid=True, gid=False, host=1000000, inside=0, size=1000000000),
         IdRange(uid=False, gid=True, host=1000000, inside=0, size=1000000000)]


def test_a_sane_map_passes_and_impossible_ones_are_refused() -> None:
    check_ranges(INCUS)
    with pytest.raises(ValueError, match="overlapping uid"):
        check_ranges([IdRange(True, False, 1000, 0, 100), IdRange(True, False, 1050, 0, 100)])
    with pytest.raises(ValueError, match="impossible"):
        check_ranges([IdRange(True, False, 2**32 - 10, 0, 100)])
    with pytest.raises(ValueError, match="impossible"):
        check_ranges([IdRange(False, False, 1000, 0, 100)])
    with pytest.raises(ValueError, match="impossible"):
        check_ranges([IdRange(True, False, -5, 0, 100)])


def test_a_peer_header_with_a_bad_idmap_is_a_protocol_error() -> None:
    good = pb.MigrationHeader(fs=pb.RSYNC, idmap=[pb.IDMapType(isuid=True, isgid=True, hostid=1000000, nsid=0,
                                                               maprange=65536)])
    assert protocol.source_idmap(good) == [IdRange(True, True, 1000000, 0, 65536)]
    bad = pb.MigrationHeader(fs=pb.RSYNC, idmap=[pb.IDMapType(isuid=True, isgid=False, hostid=-1, nsid=0,
                                                              maprange=10)])
    with pytest.raises(protocol.ProtocolError, match="idmap"):
        protocol.check_offer(bad)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")
def test_shifted_files_get_the_owners_the_container_sees(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "suid").write_text("#!/bin/sh\n")
    (root / "link").symlink_to("/no/such/file")
    (root / "host-owned").write_text("outside every range\n")
    os.chown(root, 1000000, 1000000)
    os.chown(root / "etc", 1000000, 1000000)
    os.chown(root / "etc/passwd", 1001000, 1000100)
    os.chown(root / "suid", 1000000, 1000000)
    os.chmod(root / "suid", 0o4755)
    os.lchown(root / "link", 1000033, 1000044)
    os.chown(root / "host-owned", 500, 600)
    assert unshift(root, INCUS) == 5
    owners = {p: (p.lstat().st_uid, p.lstat().st_gid) for p in [root, *root.rglob("*")]}
    assert owners == {root: (0, 0), root / "etc": (0, 0), root / "etc/passwd": (1000, 100),
                      root / "suid": (0, 0), root / "link": (33, 44), root / "host-owned": (500, 600)}
    assert stat.S_IMODE((root / "suid").stat().st_mode) == 0o4755
