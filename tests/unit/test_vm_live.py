"""The pure parts of a VM's live move: the plan's refusals, the machine description a peer sends and how
the target rebuilds (or refuses) it, the CLI's last line."""

from __future__ import annotations

import pytest

from stapes.api.errors import BadRequest
from stapes.client.migration import MigrationResult
from stapes.client.move import Plan, Situation, live_summary, plan
from stapes.server.instances.qemu_live import describe, rebuild
from stapes.server.instances.qemu_machine import Disk, Machine, Nic


def machine(**changes: object) -> Machine:
    base = Machine(name="v1", uuid="0b5e7d1c-3a4f-4f5e-9a0b-1c2d3e4f5a6b", runtime="/run/x", accel="tcg",
                   cpu_model="max", cpus=1, memory_mib=256, firmware_code="/code", firmware_vars="/vars",
                   disks=(Disk("root", "/disk", boot_index=1),),
                   nics=(Nic("eth0", "tap-here", "br0", "10:66:6a:00:00:01"),))
    return Machine(**{**base.__dict__, **changes})  # type: ignore[arg-type]


def vm_situation(**changes: object) -> Situation:
    base = {"move": True, "running": True, "stateless": False, "same_server": False, "same_place": False,
            "same_name": True, "same_project": True, "instance_type": "virtual-machine", "stateful": True}
    return Situation(**{**base, **changes})  # type: ignore[arg-type]


def test_the_plan_of_a_running_vm() -> None:
    assert plan(vm_situation()) == Plan(live=True, delete_source=True)
    assert plan(vm_situation(move=False)) == Plan(live=True, keep_running=True, clone=True)  # its MACs, its UUID
    assert plan(vm_situation(stateless=True)) == Plan(stop_first=True, delete_source=True)
    with pytest.raises(BadRequest, match="between Stapes and Incus.*--stateless"):
        plan(vm_situation(incus_peer=True))
    assert plan(vm_situation(incus_peer=True, stateless=True)).stop_first  # stopped exchanges keep working
    assert plan(vm_situation(instance_type="container", incus_peer=True, stateful=False)).live  # CRIU with Incus


def test_the_target_rebuilds_the_source_machine_on_its_own_files() -> None:
    source = machine(memory_mib=512, cpus=2, uuid="11111111-2222-3333-4444-555555555555")
    own = machine(runtime="/run/target", firmware_vars="/target/vars", disks=(Disk("root", "/target/disk",
                                                                                   boot_index=1),),
                  nics=(Nic("eth0", "tap-there", "br1", "10:66:6a:00:00:01"),))
    built = rebuild(own, describe(source, postcopy=False, agent=True), host_memory_mib=4096)
    assert (built.memory_mib, built.cpus, built.uuid) == (512, 2, "11111111-2222-3333-4444-555555555555")
    assert built.runtime == "/run/target" and built.disks[0].path == "/target/disk"
    assert built.nics[0].tap == "tap-there" and built.nics[0].bridge == "br1"


@pytest.mark.parametrize(("change", "message"), [
    ({"cpu_model": "host"}, "CPU model 'host'"),
    ({"machine_type": "pc"}, "machine type 'pc'"),
    ({"cpus": 0}, "CPUs"),
    ({"cpus": True}, "'cpus'"),
    ({"memory_mib": 1 << 20}, "larger server"),
    ({"uuid": "../../etc"}, "UUID"),
    ({"disks": []}, "other disks"),
    ({"nics": [{"name": "eth9", "mac": "10:66:6a:00:00:01"}]}, "nic 'eth9'"),
    ({"nics": [{"name": "eth0", "mac": "x"}]}, "MAC"),
    ({"nics": []}, "nics the source's VM lacks"),
    ({"nics": [{"name": "eth0", "mac": "10:66:6a:00:00:01", "mtu": 10}]}, "MTU"),
])
def test_a_machine_this_server_cannot_build_the_same_is_refused(change: dict[str, object], message: str) -> None:
    described = {**describe(machine(), postcopy=False, agent=False), **change}
    with pytest.raises(BadRequest, match=message):
        rebuild(machine(), described, host_memory_mib=4096)
    with pytest.raises(BadRequest, match="not an object"):
        rebuild(machine(), ["not", "a", "dict"], host_memory_mib=4096)


def test_the_target_builds_the_source_versioned_machine_type_where_its_qemu_can() -> None:
    from dataclasses import replace

    from stapes.server.instances.accel import parse_machine_types
    listing = ("Supported machines are:\n"
               "pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-10.0)\n"
               "q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-10.0)\n"
               "pc-q35-10.0          Standard PC (Q35 + ICH9, 2009) (default)\n"
               "pc-q35-9.2           Standard PC (Q35 + ICH9, 2009)\n"
               "pc-i440fx-10.0       Standard PC (i440FX + PIIX, 1996)\n")
    current, versioned = parse_machine_types(listing)
    assert (current, versioned) == ("pc-q35-10.0", ("pc-q35-10.0", "pc-q35-9.2"))
    assert parse_machine_types("no machines here") == ("q35", ())
    here = replace(machine(), machine_type=current)
    older = {**describe(replace(machine(), machine_type="pc-q35-9.2"), postcopy=False, agent=False)}
    assert rebuild(here, older, host_memory_mib=4096, machine_types=versioned).machine_type == "pc-q35-9.2"
    alias = {**describe(machine(), postcopy=False, agent=False)}  # an older Stapes source
    assert rebuild(here, alias, host_memory_mib=4096, machine_types=versioned).machine_type == "q35"
    newer = {**older, "machine_type": "pc-q35-11.0"}
    with pytest.raises(BadRequest, match="'pc-q35-11.0', which QEMU here does not build.*upgrade QEMU"):
        rebuild(here, newer, host_memory_mib=4096, machine_types=versioned)


def test_the_last_line_of_a_live_move() -> None:
    vm = MigrationResult("block-and-rsync", 0.05, {"live": {"downtime_ms": 12, "memory_bytes": 300 << 20,
                                                             "iterations": 4, "total_s": 3.5}}, {})
    assert live_summary(vm) == "downtime 12 ms (QEMU's figure), 300 MiB of memory in 4 passes, total 3.50s"
    container = MigrationResult("tar", 0.25, {"live": {"frozen_s": 0.25}}, {})
    assert live_summary(container) == "frozen 0.25s"


def test_the_progress_line_of_a_live_vm_move() -> None:
    from stapes.cli.render import _progress_text
    progress = {"stage": "memory", "bytes": 100 * 2**20, "total": 250 * 2**20, "rate": 32 * 2**20, "percent": 40,
                "eta": 5}
    vm = {"phase": "memory", "memory_bytes": 100 * 2**20, "memory_remaining": 150 * 2**20, "iteration": 3,
          "dirty_rate_pages": 256, "expected_downtime_ms": 120, "downtime_limit_ms": 300, "throttle_percent": 0}
    assert _progress_text({"metadata": {"progress": progress, "vm": vm}}) == (
        "memory: 40% 100.00MiB/250MiB 32MiB/s ETA 5s, 150MiB left, pass 3, dirtying 1MiB/s, "
        "expected downtime 120 ms (allowed 300 ms)")
    throttled = {**vm, "throttle_percent": 30}
    assert _progress_text({"metadata": {"progress": progress, "vm": throttled}}).endswith(", guest throttled 30%")
    disk = {"stage": "disk", "bytes": 2**20, "total": 4 * 2**20, "rate": 2**20, "percent": 25, "eta": 3}
    assert _progress_text({"metadata": {"progress": disk, "vm": {"phase": "disk"}}}) == (
        "disk: 25% 1.00MiB/4MiB 1MiB/s ETA 3s")
    # A hostile or older server's figures of the wrong type print as zero, never a traceback.
    odd = {**vm, "iteration": "x", "memory_remaining": None}
    assert ", 0B left, pass 0," in _progress_text({"metadata": {"progress": progress, "vm": odd}})
