"""Transport negotiation, from what the storage drivers at both ends declare (pure functions).

The sender offers its transports best first; the receiver takes the first one it can receive. Plain rsync is
always the fallback, since every driver and every Incus server can do it. A refresh always uses rsync: it is
the one transport that updates an existing copy in place, sending only what changed.
"""

from __future__ import annotations

from collections.abc import Sequence

from stapes.server.migration import migrate_pb2 as pb

RSYNC = "rsync"
TAR_STREAM = "tar-stream"
BTRFS = "btrfs"
PREFERENCE = (BTRFS, TAR_STREAM, RSYNC)
RSYNC_FEATURES = ("xattrs", "delete", "compress", "bidirectional", "stapesHardLinks")


def offer(sendable: Sequence[str], *, refresh: bool) -> list[str]:
    if refresh:
        return [RSYNC]
    ordered = [t for t in PREFERENCE if t in sendable]
    if RSYNC not in ordered:
        ordered.append(RSYNC)
    return ordered


def choose(offered: Sequence[str], receivable: Sequence[str]) -> str:
    for transport in offered:
        if transport in receivable or transport == RSYNC:
            return transport
    return RSYNC


def fs_type(transport: str) -> pb.MigrationFSType:
    return pb.BTRFS if transport == BTRFS else pb.RSYNC


def offer_header(sendable: Sequence[str], *, refresh: bool, total_bytes: int,
                 snapshot_names: Sequence[str] = ()) -> pb.MigrationHeader:
    transports = offer(sendable, refresh=refresh)
    return pb.MigrationHeader(
        fs=fs_type(transports[0]), criu=pb.NONE, snapshotNames=list(snapshot_names), refresh=refresh,
        rsyncFeatures=pb.rsyncFeatures(xattrs=True, delete=True, compress=False, bidirectional=False,
                                       stapesHardLinks=True),
        stapesTransports=transports, stapesTotalBytes=total_bytes, indexHeaderVersion=0,
    )


def answer_header(offer_: pb.MigrationHeader, receivable: Sequence[str]) -> tuple[pb.MigrationHeader, str]:
    """The receiver's reply and the transport it chose. An Incus sender offers no Stapes transports: its
    `fs` field decides (rsync unless both sides could do better)."""
    offered = list(offer_.stapesTransports) or ([BTRFS] if offer_.fs == pb.BTRFS else []) + [RSYNC]
    chosen = choose(offered, receivable)
    features = offer_.rsyncFeatures if offer_.HasField("rsyncFeatures") else pb.rsyncFeatures()
    reply = pb.MigrationHeader(
        fs=fs_type(chosen), criu=pb.NONE, refresh=offer_.refresh, snapshotNames=list(offer_.snapshotNames),
        rsyncFeatures=pb.rsyncFeatures(xattrs=features.xattrs, delete=features.delete, compress=features.compress,
                                       bidirectional=False, stapesHardLinks=features.stapesHardLinks),
        stapesTransports=[chosen],
    )
    return reply, chosen


def chosen_transport(answer: pb.MigrationHeader) -> str:
    """What the sender learns from the reply; an Incus receiver names no Stapes transport."""
    if answer.stapesTransports:
        return str(answer.stapesTransports[0])
    return BTRFS if answer.fs == pb.BTRFS else RSYNC


def rsync_features(header: pb.MigrationHeader) -> list[str]:
    if not header.HasField("rsyncFeatures"):
        return []
    return [name for name in RSYNC_FEATURES if getattr(header.rsyncFeatures, name)]
