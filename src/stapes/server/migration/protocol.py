"""Transport negotiation, from what the storage drivers at both ends declare (pure functions).

The sender offers its transports best first; the receiver takes the first one it can receive. Plain rsync is
always the fallback, since every driver and every Incus server can do it. A refresh always uses rsync: it is
the one transport that updates an existing copy in place, sending only what changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from google.protobuf.message import DecodeError

from stapes.api.config_keys import validate_instance_config
from stapes.api.devices import validate_devices
from stapes.api.errors import BadRequest, InternalError, StapesError
from stapes.api.names import validate_entity_name
from stapes.server.idmap import IdRange, check_ranges
from stapes.server.migration import migrate_pb2 as pb
from stapes.server.store.db import SnapshotRow

RSYNC = "rsync"
TAR_STREAM = "tar-stream"
BTRFS = "btrfs"
PREFERENCE = (BTRFS, TAR_STREAM, RSYNC)
RSYNC_FEATURES = ("xattrs", "delete", "compress", "bidirectional", "stapesHardLinks")
MAX_CONTROL_MESSAGE = 1 << 20  # a header with thousands of snapshots fits; anything larger is hostile
MAX_SNAPSHOTS = 4096
MAX_TOTAL_BYTES = 1 << 50


class ProtocolError(BadRequest):
    """The peer sent something the migration protocol does not allow: nothing was written because of it."""


def parse_header(data: bytes | None, sender: str) -> pb.MigrationHeader:
    """A MigrationHeader from the peer, or a ProtocolError saying what was wrong with it."""
    if data is None:
        raise ProtocolError(f"Protocol error: the {sender} sent an empty migration header")
    if len(data) > MAX_CONTROL_MESSAGE:
        raise ProtocolError(f"Protocol error: the {sender}'s migration header is {len(data)} bytes, more than "
                            f"{MAX_CONTROL_MESSAGE}")
    try:
        header: pb.MigrationHeader = pb.MigrationHeader.FromString(data)
    except (DecodeError, ValueError, RuntimeError) as err:
        raise ProtocolError(f"Protocol error: the {sender} sent an invalid migration header ({err})") from None
    if not header.IsInitialized():  # proto2 required fields (the filesystem type) must be there
        raise ProtocolError(f"Protocol error: the {sender}'s migration header lacks required fields")
    return header


_Message = TypeVar("_Message", pb.MigrationControl, pb.MigrationSync)


def _parse_small(kind: type[_Message], data: bytes | None, sender: str, what: str) -> _Message:
    """One small protobuf message from the peer, or a ProtocolError saying what was wrong with it."""
    if data is None or len(data) > MAX_CONTROL_MESSAGE:
        raise ProtocolError(f"Protocol error: the {sender} sent an empty or oversized {what}")
    try:
        message: _Message = kind.FromString(data)
    except (DecodeError, ValueError, RuntimeError) as err:
        raise ProtocolError(f"Protocol error: the {sender} sent an invalid {what} ({err})") from None
    if not message.IsInitialized():
        raise ProtocolError(f"Protocol error: the {sender}'s {what} lacks required fields")
    return message


def parse_control(data: bytes | None, sender: str) -> pb.MigrationControl:
    return _parse_small(pb.MigrationControl, data, sender, "control message")


def parse_sync(data: bytes | None, sender: str) -> pb.MigrationSync:
    """The MigrationSync that follows each pre-copy round on the criu channel."""
    return _parse_small(pb.MigrationSync, data, sender, "pre-copy sync message")


def check_offer(offer_: pb.MigrationHeader) -> None:
    """What a source may offer, checked with the REST API's own rules before a byte is written: snapshot
    names that are valid entity names (no '/', no '..'), each offered once and described at most once;
    snapshot config and devices that the target would accept from a client; a sane size."""
    names = list(offer_.snapshotNames)
    if len(names) > MAX_SNAPSHOTS:
        raise ProtocolError(f"Protocol error: {len(names)} snapshots offered, at most {MAX_SNAPSHOTS} are accepted")
    if len(set(names)) != len(names):
        raise ProtocolError("Protocol error: a snapshot is offered twice")
    described = [s.name for s in offer_.snapshots]
    if len(set(described)) != len(described) or not set(described) <= set(names):
        raise ProtocolError("Protocol error: the snapshot descriptions do not match the snapshot names offered")
    try:
        for name in names:
            validate_entity_name("snapshot", name)
        for snap in offer_.snapshots:
            config = {c.key: c.value for c in snap.localConfig}
            validate_instance_config(config)
            devices = {d.name: {c.key: c.value for c in d.config} for d in snap.localDevices}
            for device in devices:
                validate_entity_name("device", device)
            validate_devices(devices)
            for profile in snap.profiles:
                validate_entity_name("profile", profile)
    except StapesError as err:
        raise ProtocolError(f"Refused the source's snapshots: {err.message}") from None
    if not 0 <= offer_.stapesTotalBytes <= MAX_TOTAL_BYTES:
        raise ProtocolError(f"Protocol error: an impossible size ({offer_.stapesTotalBytes} bytes)")
    source_idmap(offer_)


def source_idmap(offer_: pb.MigrationHeader) -> list[IdRange]:
    """How the source's files are shifted on disk (an Incus source without id-mapped mounts); empty when
    they are not. The receiver shifts them back, as Stapes keeps files unshifted."""
    if len(offer_.idmap) > 64:
        raise ProtocolError("Protocol error: more than 64 id ranges in the source's idmap")
    ranges = [IdRange(uid=m.isuid, gid=m.isgid, host=m.hostid, inside=m.nsid, size=m.maprange) for m in offer_.idmap]
    try:
        check_ranges(ranges)
    except ValueError as err:
        raise ProtocolError(f"Protocol error: the source's idmap is invalid: {err}") from None
    return ranges


RAW_PREFIXES = ("raw.", "security.")


def check_snapshot_raw_keys(snap: pb.Snapshot, instance_config: dict[str, str]) -> None:
    """Keys that hand the host to the container (raw LXC lines, security settings) come from the client that
    asked for the move, never from the peer: a snapshot may carry them only as the instance itself has them."""
    for item in snap.localConfig:
        if item.key.startswith(RAW_PREFIXES) and instance_config.get(item.key) != item.value:
            raise ProtocolError(f"Refused the source's snapshot {snap.name!r}: it sets {item.key!r}, which only the "
                                "client's own request may set (set it on the instance with -c, or copy with "
                                "--instance-only)")


def check_answer(answer: pb.MigrationHeader, offered: Sequence[str], snapshots: Sequence[str]) -> str:
    """The transport the target chose, which must be one we offered, and snapshots we have."""
    transport = chosen_transport(answer)
    if transport not in offered:
        raise ProtocolError(f"Protocol error: the target chose transport {transport!r}, which was not offered")
    unknown = [n for n in answer.snapshotNames if n not in snapshots]
    if unknown or len(set(answer.snapshotNames)) != len(answer.snapshotNames):
        raise ProtocolError(f"Protocol error: the target asked for snapshots that were not offered: {unknown[:3]}")
    return transport


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


def snapshot_message(row: SnapshotRow) -> pb.Snapshot:
    return pb.Snapshot(
        name=row.name, localConfig=[pb.Config(key=k, value=v) for k, v in sorted(row.config.items())],
        profiles=list(row.profiles), ephemeral=False,
        localDevices=[pb.Device(name=n, config=[pb.Config(key=k, value=v) for k, v in sorted(d.items())])
                      for n, d in sorted(row.devices.items())],
        architecture=0, stateful=False, creation_date=int(row.created_at), description=row.description,
    )


def snapshot_row(project: str, instance: str, message: pb.Snapshot) -> SnapshotRow:
    return SnapshotRow(
        project=project, instance=instance, name=message.name, description=message.description,
        config={c.key: c.value for c in message.localConfig},
        devices={d.name: {c.key: c.value for c in d.config} for d in message.localDevices},
        profiles=list(message.profiles), created_at=float(message.creation_date),
    )


def state_type(name: str | None) -> int:
    """A driver's declared live state type (Incus's CRIUType name: CRIU_RSYNC, VM_QEMU) as the header's number."""
    try:
        return int(pb.CRIUType.Value(name or ""))
    except ValueError:
        raise InternalError(f"Unknown live state type {name!r}") from None


def offer_header(sendable: Sequence[str], *, refresh: bool, total_bytes: int,
                 snapshots: Sequence[SnapshotRow] = (), live: bool = False, predump: bool = False,
                 lazy: bool = False, streamed_state: bool = False,
                 live_type: int = pb.CRIU_RSYNC) -> pb.MigrationHeader:
    """`fs` says rsync: an Incus receiver reads only that field and would expect its own btrfs stream format
    for BTRFS, which Stapes's btrfs transport is not; Stapes receivers read `stapesTransports`. A stopped
    instance says no `criu` (to Incus, CRIU type NONE means a running instance, whose volume follows a second
    time); a live one says CRIU_RSYNC, Incus's type for a state sent on the criu websocket, and `predump` when
    pre-copy rounds come before the final checkpoint, and `stapesStreamedState` when it can send the memory
    pages while the checkpoint writes them (never with lazy pages: the memory then follows the restore).
    `live_type`: the instance driver's declared state type (CRIU_RSYNC for containers, VM_QEMU for VMs)."""
    transports = offer(sendable, refresh=refresh)
    header = pb.MigrationHeader(
        fs=pb.RSYNC, snapshotNames=[s.name for s in snapshots],
        snapshots=[snapshot_message(s) for s in snapshots], refresh=refresh,
        rsyncFeatures=pb.rsyncFeatures(xattrs=True, delete=True, compress=False, bidirectional=False,
                                       stapesHardLinks=True),
        stapesTransports=transports, stapesTotalBytes=total_bytes, indexHeaderVersion=0,
    )
    if live:
        header.criu = live_type  # type: ignore[assignment]
        header.predump = predump
        header.stapesLazy = lazy
        header.stapesStreamedState = streamed_state and not lazy
        header.stapesHandover = not lazy
    return header


def live_offered(offer_: pb.MigrationHeader, live_type: int = pb.CRIU_RSYNC) -> bool:
    """The sender moves a running instance live: its state (of the receiving driver's type) follows the
    volume on the criu websocket. From a Stapes sender only (an Incus sender's live protocol is not spoken
    yet: `check_live` refuses it)."""
    return offer_.HasField("criu") and offer_.criu == live_type


def check_live(offer_: pb.MigrationHeader, requested: bool, live_type: int = pb.CRIU_RSYNC) -> None:
    """The client that created the target said whether the move is live; the source must agree."""
    offered = live_offered(offer_, live_type)
    if offered and not offer_.stapesTransports:
        raise ProtocolError("Live migration from an Incus server is not supported yet: move the instance with "
                            "--stateless")
    if offered != requested:
        raise ProtocolError(f"Protocol error: the source {'offers' if offered else 'does not offer'} a live move, "
                            f"but the request {'asked' if requested else 'did not ask'} for one")


def live_accepted(answer: pb.MigrationHeader, live_type: int = pb.CRIU_RSYNC) -> bool:
    return answer.HasField("criu") and answer.criu == live_type


def answer_header(offer_: pb.MigrationHeader, receivable: Sequence[str], wanted_snapshots: Sequence[str] | None = None,
                  *, refresh: bool = False, streamed_state: bool = False,
                  live_type: int = pb.CRIU_RSYNC) -> tuple[pb.MigrationHeader, str]:
    """The receiver's reply and the transport it chose. An Incus sender offers no Stapes transports: rsync
    then, whatever its `fs` field says (Incus's own btrfs stream format is not Stapes's). The reply's `fs`
    always says rsync for the same reason; Stapes senders read `stapesTransports`. A running Incus sender's
    CRIU type NONE is echoed: the volume then arrives twice (see `final_sync`). `wanted_snapshots` (default:
    all offered) are the snapshots the receiver asks for, in the sender's order. `streamed_state`: the
    receiver's driver takes state files while the checkpoint writes them; said yes only if offered."""
    wanted = list(offer_.snapshotNames) if wanted_snapshots is None else [
        n for n in offer_.snapshotNames if n in wanted_snapshots]
    # Transports we do not know (a newer peer's) are skipped; rsync stays the fallback.
    offered = [t for t in offer_.stapesTransports if t in PREFERENCE] or [RSYNC]
    chosen = RSYNC if refresh else choose(offered, receivable)
    features = offer_.rsyncFeatures if offer_.HasField("rsyncFeatures") else pb.rsyncFeatures()
    reply = pb.MigrationHeader(
        fs=pb.RSYNC, refresh=refresh, snapshotNames=wanted,
        # No compression, even when an Incus sender offers it: rsync's zlib is CPU-bound at ~25 MB/s here,
        # four times slower than sending the bytes (measured by bench/interop.py).
        rsyncFeatures=pb.rsyncFeatures(xattrs=features.xattrs, delete=features.delete, compress=False,
                                       bidirectional=False, stapesHardLinks=features.stapesHardLinks),
        stapesTransports=[chosen],
    )
    if final_sync(offer_):
        reply.criu = pb.NONE
    elif live_offered(offer_, live_type):
        reply.criu = live_type  # type: ignore[assignment]  # reached only once check_live and the driver accepted the live move
        reply.predump = offer_.predump
        reply.stapesStreamedState = offer_.stapesStreamedState and streamed_state and not offer_.stapesLazy
        reply.stapesHandover = offer_.stapesHandover and not offer_.stapesLazy
    return reply, chosen


def state_streamed(offer_: pb.MigrationHeader, answer: pb.MigrationHeader) -> bool:
    """The memory pages travel while the checkpoint writes them: the sender offered it and the receiver said
    yes (a receiver that does not know the field says nothing, and the state then goes in one tar)."""
    return offer_.stapesStreamedState and answer.stapesStreamedState


def handed_over(offer_: pb.MigrationHeader, answer: pb.MigrationHeader) -> bool:
    """Both ends keep the rule that two copies never run: the target restores the instance stopped, says so,
    and runs it only once the source answered that it gave its own copy up (recorded, so that a restart of
    the source does not run it again). Without it (an older Stapes peer), the target runs it at once."""
    return offer_.stapesHandover and answer.stapesHandover


def final_sync(offer_: pb.MigrationHeader) -> bool:
    """An Incus sender whose instance runs (a stateless copy) says CRIU type NONE and then sends the volume
    twice: a first pass while it runs, then a final pass of what changed meanwhile."""
    return not offer_.stapesTransports and offer_.HasField("criu") and offer_.criu == pb.NONE


def sender_reports_completion(offer_: pb.MigrationHeader) -> bool:
    """A Stapes sender says "all sent" on the control channel before the receiver commits, so a sender that
    dies before that point leaves no copy behind. An Incus sender never does: there the receiver's own tools
    (rsync's exit status) tell that the data is complete, and its control message can only be a failure."""
    return bool(offer_.stapesTransports)


def chosen_transport(answer: pb.MigrationHeader) -> str:
    """What the sender learns from the reply; an Incus receiver names no Stapes transport, and takes rsync."""
    if answer.stapesTransports:
        return str(answer.stapesTransports[0])
    return RSYNC


def rsync_features(header: pb.MigrationHeader) -> list[str]:
    if not header.HasField("rsyncFeatures"):
        return []
    return [name for name in RSYNC_FEATURES if getattr(header.rsyncFeatures, name)]
