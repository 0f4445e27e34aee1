"""Transport negotiation, from what the storage drivers at both ends declare (pure functions).

The sender offers its transports best first; the receiver takes the first one it can receive. Only transports
that carry the volume's content (filesystem for a container, block for a VM) take part. The fallback is the
transport an Incus peer speaks for that content (each transport declares its Incus fs type): plain rsync for a
filesystem volume, block-and-rsync for a VM's (Incus's BLOCK_AND_RSYNC: an Incus server offers and accepts
nothing else for a VM). A refresh uses a transport that updates an existing copy in place (rsync between Stapes
servers: only what changed travels).

A block volume's size (its disk's apparent size) is in the header's `volumeSize` (Incus's field, set by Incus
for VMs only) and each snapshot's in its `size` config item (Incus's too); the target checks them before
anything is written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

from google.protobuf.message import DecodeError

from stapes.api.config_keys import validate_instance_config
from stapes.api.devices import validate_devices
from stapes.api.errors import BadRequest, InternalError, StapesError
from stapes.api.names import validate_entity_name
from stapes.server.idmap import IdRange, check_ranges
from stapes.server.migration import migrate_pb2 as pb
from stapes.server.storage.base import BLOCK, CONTENTS, FILESYSTEM
from stapes.server.storage.service import TRANSFER_TYPES
from stapes.server.storage.transfer import Transport
from stapes.server.store.db import SnapshotRow

RSYNC = "rsync"
TAR_STREAM = "tar-stream"
BTRFS = "btrfs"
BLOCK_AND_RSYNC = "block-and-rsync"
PREFERENCE = (BTRFS, TAR_STREAM, RSYNC, BLOCK_AND_RSYNC)
SIZE_KEY = "size"  # Incus's item in a block volume snapshot's localConfig: that snapshot's disk size
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
            config = {c.key: c.value for c in snap.localConfig if c.key != SIZE_KEY}
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


# What a device may reach on the host, per type: a disk with a host path (no pool), a nic on a host bridge (or
# with a host-side name or MAC). These keys of a peer's snapshot device must be the instance's own (the client's
# request, this server's profiles). Any other device type reaches the host in ways not listed here: the whole
# device must then be the instance's.
HOST_KEYS: dict[str, tuple[str, ...]] = {
    "disk": ("source", "pool", "readonly"),
    "nic": ("network", "nictype", "parent", "host_name", "hwaddr"),
    "none": (),
}


def reaches_host(device: Mapping[str, str]) -> bool:
    """A device the host's resources are given to (pure): a disk with a host source path, a nic on a host bridge
    or naming its host side; any type without rules here."""
    kind = device.get("type", "")
    if kind == "disk":
        return bool(device.get("source")) and not device.get("pool")
    if kind == "nic":
        return bool(device.get("parent") or device.get("nictype") or device.get("host_name"))
    return kind not in HOST_KEYS


def check_snapshot_devices(snap: pb.Snapshot, instance_devices: Mapping[str, Mapping[str, str]]) -> None:
    """A peer's snapshot devices that reach the host must be the instance's own, as the client that asked for the
    move (and this server's profiles) gave them: a snapshot restored later applies its devices, so a peer could
    otherwise bind-mount any host path into the instance or join it to any host bridge (pure: unit-tested)."""
    for item in snap.localDevices:
        device = {c.key: c.value for c in item.config}
        if not reaches_host(device):
            continue
        own = instance_devices.get(item.name)
        keys = HOST_KEYS.get(device.get("type", ""))
        same = own is not None and (dict(own) == device if keys is None else all(
            own.get(key, "") == device.get(key, "") for key in ("type", *keys)))
        if not same:
            what = ", ".join(f"{k}={device[k]}" for k in ("type", *(keys or ())) if device.get(k))
            raise ProtocolError(
                f"Refused the source's snapshot {snap.name!r}: its device {item.name!r} ({what[:200]}) reaches the "
                f"host, and the instance's own device {item.name!r} is "
                f"{'absent' if own is None else 'different'}; only the client's own request may give such a "
                "device (add it to the instance, or copy with --instance-only)")


def check_answer(answer: pb.MigrationHeader, offered: Sequence[str], snapshots: Sequence[str],
                 content: str = FILESYSTEM) -> str:
    """The transport the target chose, which must be one we offered, and snapshots we have. An Incus target
    names its fs type only: the one it speaks for the volume's content, or it cannot take the volume."""
    if not answer.stapesTransports and answer.fs != incus_fs(content):
        raise ProtocolError(
            f"The target (an Incus server) answered with fs type {_fs_name(answer.fs)} for {_what(content)}, for "
            f"which Incus uses {_fs_name(incus_fs(content))}: it cannot take this instance")
    transport = chosen_transport(answer, content)
    if transport not in offered:
        raise ProtocolError(f"Protocol error: the target chose transport {transport!r}, which was not offered")
    unknown = [n for n in answer.snapshotNames if n not in snapshots]
    if unknown or len(set(answer.snapshotNames)) != len(answer.snapshotNames):
        raise ProtocolError(f"Protocol error: the target asked for snapshots that were not offered: {unknown[:3]}")
    return transport


def _declared(transport: str) -> type[Transport] | None:
    return TRANSFER_TYPES.get(transport)


def carries(transport: str, content: str) -> bool:
    declared = _declared(transport)
    return declared is not None and content in declared.carries


def refreshes(transport: str) -> bool:
    declared = _declared(transport)
    return declared is not None and declared.refreshes


def fallback(content: str) -> str:
    """The transport every peer can do for this content: the one Incus speaks for it."""
    for name in PREFERENCE:
        declared = _declared(name)
        if declared is not None and content in declared.incus:
            return name
    raise ProtocolError(f"No transport moves {content} volumes")  # a driver declaration is missing


def incus_fs(content: str) -> pb.MigrationFSType:
    """The header's `fs` for this content: Incus's fs type of the fallback."""
    declared = _declared(fallback(content))
    assert declared is not None
    return declared.incus[content]


def _fs_name(fs: int) -> str:
    names: dict[int, str] = {int(value): str(name) for name, value in pb.MigrationFSType.items()}
    return names.get(fs, str(fs))


def _what(content: str) -> str:
    return "a virtual machine's volume" if content == BLOCK else "a container's volume"


def offer(sendable: Sequence[str], *, refresh: bool, content: str = FILESYSTEM) -> list[str]:
    ordered = [t for t in PREFERENCE if t in sendable and carries(t, content) and (refreshes(t) or not refresh)]
    if fallback(content) not in ordered:
        ordered.append(fallback(content))
    return ordered


def choose(offered: Sequence[str], receivable: Sequence[str], content: str = FILESYSTEM, *,
           refresh: bool = False) -> str:
    last_resort = fallback(content)
    for transport in offered:
        if not carries(transport, content) or (refresh and not refreshes(transport)):
            continue
        if transport in receivable or transport == last_resort:
            return transport
    return last_resort


def snapshot_message(row: SnapshotRow, block_size: int | None = None) -> pb.Snapshot:
    """`block_size`: a VM snapshot's disk size, sent as Incus does (its `size` item, which an Incus target
    extends the snapshot's disk to)."""
    config = {k: v for k, v in row.config.items() if k != SIZE_KEY}
    if block_size is not None:
        config[SIZE_KEY] = str(block_size)
    return pb.Snapshot(
        name=row.name, localConfig=[pb.Config(key=k, value=v) for k, v in sorted(config.items())],
        profiles=list(row.profiles), ephemeral=False,
        localDevices=[pb.Device(name=n, config=[pb.Config(key=k, value=v) for k, v in sorted(d.items())])
                      for n, d in sorted(row.devices.items())],
        architecture=0, stateful=False, creation_date=int(row.created_at), description=row.description,
    )


def snapshot_row(project: str, instance: str, message: pb.Snapshot) -> SnapshotRow:
    return SnapshotRow(
        project=project, instance=instance, name=message.name, description=message.description,
        config={c.key: c.value for c in message.localConfig if c.key != SIZE_KEY},
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
                 lazy: bool = False, streamed_state: bool = False, content: str = FILESYSTEM,
                 volume_size: int | None = None, snapshot_sizes: Mapping[str, int] | None = None,
                 live_type: int = pb.CRIU_RSYNC) -> pb.MigrationHeader:
    """`fs` says rsync: an Incus receiver reads only that field and would expect its own btrfs stream format
    for BTRFS, which Stapes's btrfs transport is not; Stapes receivers read `stapesTransports`. A stopped
    instance says no `criu` (to Incus, CRIU type NONE means a running instance, whose volume follows a second
    time); a live one says CRIU_RSYNC, Incus's type for a state sent on the criu websocket, and `predump` when
    pre-copy rounds come before the final checkpoint, and `stapesStreamedState` when it can send the memory
    pages while the checkpoint writes them (never with lazy pages: the memory then follows the restore).
    A block volume (`content`) says BLOCK_AND_RSYNC, Incus's type for a VM, with its disk's size in
    `volume_size` and each snapshot's in `snapshot_sizes` (both required then). `live_type`: the instance
    driver's declared state type (CRIU_RSYNC for containers, VM_QEMU for VMs)."""
    transports = offer(sendable, refresh=refresh, content=content)
    sizes = dict(snapshot_sizes or {})
    if content == BLOCK and (volume_size is None or any(s.name not in sizes for s in snapshots)):
        raise ValueError("a block volume's offer needs its size and its snapshots' sizes")
    header = pb.MigrationHeader(
        fs=incus_fs(content), snapshotNames=[s.name for s in snapshots],
        snapshots=[snapshot_message(s, sizes.get(s.name)) for s in snapshots], refresh=refresh,
        rsyncFeatures=pb.rsyncFeatures(xattrs=True, delete=True, compress=False, bidirectional=False,
                                       stapesHardLinks=True),
        stapesTransports=transports, stapesTotalBytes=total_bytes, indexHeaderVersion=0,
    )
    if content == BLOCK:
        header.volumeSize = volume_size or 0
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
                  content: str = FILESYSTEM, live_type: int = pb.CRIU_RSYNC) -> tuple[pb.MigrationHeader, str]:
    """The receiver's reply and the transport it chose. An Incus sender offers no Stapes transports: rsync
    then, whatever its `fs` field says (Incus's own btrfs stream format is not Stapes's). The reply's `fs`
    always says rsync for the same reason; Stapes senders read `stapesTransports`. A running Incus sender's
    CRIU type NONE is echoed: the volume then arrives twice (see `final_sync`). `wanted_snapshots` (default:
    all offered) are the snapshots the receiver asks for, in the sender's order. `streamed_state`: the
    receiver's driver takes state files while the checkpoint writes them; said yes only if offered.
    `content`: the volume's (check_volume checked that the source sends that); a block volume's reply says
    BLOCK_AND_RSYNC, the only type an Incus sender of a VM matches."""
    wanted = list(offer_.snapshotNames) if wanted_snapshots is None else [
        n for n in offer_.snapshotNames if n in wanted_snapshots]
    # Transports we do not know (a newer peer's) are skipped; the content's fallback stays.
    offered = [t for t in offer_.stapesTransports if t in PREFERENCE] or [fallback(content)]
    chosen = choose(offered, receivable, content, refresh=refresh)
    features = offer_.rsyncFeatures if offer_.HasField("rsyncFeatures") else pb.rsyncFeatures()
    reply = pb.MigrationHeader(
        fs=incus_fs(content), refresh=refresh, snapshotNames=wanted,
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


def chosen_transport(answer: pb.MigrationHeader, content: str = FILESYSTEM) -> str:
    """What the sender learns from the reply; an Incus receiver names no Stapes transport, and takes the
    content's fallback (rsync, or block-and-rsync for a VM)."""
    if answer.stapesTransports:
        return str(answer.stapesTransports[0])
    return fallback(content)


def offered_content(offer_: pb.MigrationHeader) -> str:
    """What the source sends: a block volume says its size (Incus sets `volumeSize` for VMs only) or
    BLOCK_AND_RSYNC; anything else is a filesystem volume."""
    return BLOCK if offer_.HasField("volumeSize") or offer_.fs == pb.BLOCK_AND_RSYNC else FILESYSTEM


def snapshot_block_size(offer_: pb.MigrationHeader, name: str) -> int | None:
    """A VM snapshot's disk size from its `size` item (None when the source gave none)."""
    for snap in offer_.snapshots:
        if snap.name == name:
            for item in snap.localConfig:
                if item.key == SIZE_KEY:
                    return _size(item.value, f"snapshot {name!r}")
    return None


def volume_block_size(offer_: pb.MigrationHeader) -> int | None:
    """The volume's disk size (the header's volumeSize), None for a filesystem volume."""
    return offer_.volumeSize if offer_.HasField("volumeSize") else None


def _size(text: str, what: str) -> int:
    try:
        size = int(text)
    except ValueError:
        raise ProtocolError(f"Protocol error: the source's disk size of {what} is not a number: {text[:40]!r}") \
            from None
    if not 0 <= size <= MAX_TOTAL_BYTES:
        raise ProtocolError(f"Protocol error: an impossible disk size of {what} ({size} bytes)")
    return size


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"


def check_volume(offer_: pb.MigrationHeader, content: str, free: int, pool: str) -> int | None:
    """The target's checks of what the source sends against the instance it creates, before anything is
    written: the content (a VM's volume for a VM, a container's for a container), what an Incus source offers
    that Stapes cannot take, and a block volume's declared sizes, each within the pool's `free` bytes. Returns
    the volume's disk size (None for a filesystem volume)."""
    if content not in CONTENTS:
        raise ValueError(content)
    sent = offered_content(offer_)
    if sent != content:
        raise ProtocolError(f"The source sends {_what(sent)}, but the instance created here is "
                            f"{'a virtual machine' if content == BLOCK else 'a container'}: create the target with "
                            "the source's instance type")
    incus = not offer_.stapesTransports
    if incus and offer_.HasField("criu") and offer_.criu == pb.VM_QEMU:
        raise ProtocolError("The Incus source offers a live move of the virtual machine (its QEMU state): Incus "
                            "builds its own device tree for a VM, which QEMU's stream into a Stapes-built machine "
                            "cannot match; stop the VM first, or move it with --stateless")
    if content != BLOCK:
        return None
    for snap in offer_.snapshots:
        if snap.stateful:
            raise ProtocolError(f"The source's snapshot {snap.name!r} is stateful (it holds the VM's running "
                                "state), which Stapes cannot restore: delete that snapshot there, or copy with "
                                "--instance-only")
    size = _size(str(offer_.volumeSize), "the volume")
    if size <= 0:
        raise ProtocolError("Protocol error: the source sends a virtual machine's disk without its size")
    sizes = [("the disk", size)] + [(f"snapshot {name!r}'s disk", s) for name in offer_.snapshotNames
                                    if (s := snapshot_block_size(offer_, name)) is not None]
    for what, declared in sizes:
        if declared > free:
            raise ProtocolError(f"Storage pool {pool!r} has {_gib(free)} free, and {what} of the instance is "
                                f"{_gib(declared)}: free space in the pool, or choose another pool with -s")
    return size


def rsync_features(header: pb.MigrationHeader) -> list[str]:
    if not header.HasField("rsyncFeatures"):
        return []
    return [name for name in RSYNC_FEATURES if getattr(header.rsyncFeatures, name)]
