"""A peer's snapshots, checked before any transfer as this server checks what a client asks for: a snapshot is
recorded as the peer describes it, and restoring it later applies its config, devices and profiles to the
instance. So each snapshot must define an instance this server would accept here (its devices validated, its
networks and custom volumes existing, the driver's own checks; its root disk taken as on the instance's pool), and
whatever in it reaches the host (host paths, host bridges: protocol.check_snapshot_devices) must be the
instance's own, as the client's request gave it.
"""

from __future__ import annotations

from stapes.api.devices import root_disk
from stapes.api.errors import StapesError
from stapes.server.instances.service import InstanceService
from stapes.server.migration import migrate_pb2 as pb
from stapes.server.migration import protocol
from stapes.server.store.db import InstanceRow


async def check_peer_snapshot(instances: InstanceService, row: InstanceRow, snap: pb.Snapshot) -> None:
    """ProtocolError (saying which snapshot, what, and to copy with --instance-only) for a snapshot of the
    instance `row` (as the client's request defines it) that this server would not accept from a client."""
    protocol.check_snapshot_raw_keys(snap, row.config)
    _, own_devices = await instances.expand(row)
    protocol.check_snapshot_devices(snap, own_devices)
    recorded = protocol.snapshot_row(row.project, row.name, snap)
    volatile = {k: v for k, v in row.config.items() if k.startswith("volatile.")}
    kept = {k: v for k, v in recorded.config.items() if not k.startswith("volatile.")}
    # As restore_snapshot would make the instance: checked the way it checks it, on a copy of the row. The root
    # disk's pool is the instance's here (a move to another pool, `-s`, keeps the snapshots' own pool names, and
    # a pool reaches no host path): its other keys are checked.
    own = root_disk(own_devices)
    devices = {name: dict(device) for name, device in recorded.devices.items()}
    for device in devices.values():
        if own is not None and device.get("type") == "disk" and device.get("path") == "/" and device.get("pool"):
            device["pool"] = own[1].get("pool", "")
    restored = InstanceRow(**{**vars(row), "config": {**kept, **volatile}, "devices": devices,
                              "profiles": list(recorded.profiles)})
    try:
        spec = await instances.validate_row(restored)
        instances.driver(row.type).check_instance(spec.config, spec.devices)
    except StapesError as err:
        raise protocol.ProtocolError(f"Refused the source's snapshot {snap.name!r}: {err.message} (copy with "
                                     "--instance-only to leave the snapshots behind)") from None
