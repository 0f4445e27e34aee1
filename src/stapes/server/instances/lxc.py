"""System containers through LXC's own tools (lxc-start, lxc-stop, lxc-info, lxc-attach, lxc-checkpoint).

The tools are spawned asynchronously, so nothing blocks the event loop, and each server passes its own
lxcpath (`-P`) and cgroup directory names, so two servers on one host never collide.

Live migration goes through `lxc-checkpoint` (liblxc drives CRIU: cgroups, veths, the rootfs). What a
checkpoint needs from a container is decided when it starts: no console pty of LXC's (`lxc.console.path =
none`: liblxc 5.0 cannot hand a restored container its console; the server's own pty is its /dev/console, see
console.py), no AppArmor line on a host without AppArmor (CRIU's
restore fails on it), and an unprivileged root mounted id-mapped by the server itself (see idmapped.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from stapes.api.config_keys import parse_size
from stapes.api.errors import BadRequest, InternalError
from stapes.api.status import StatusCode
from stapes.server import process
from stapes.server import rootfs as rootfs_files
from stapes.server.coalesce import Coalesced
from stapes.server.instances import console, criu_images, hotplug, idmapped
from stapes.server.instances.criu import CriuSupport, parse_dump_stats
from stapes.server.instances.driver import (
    ExecRequest,
    GrowingFiles,
    InstanceDriver,
    InstanceSpec,
    LiveSource,
    LiveTarget,
    LiveTerms,
    MemoryRound,
    RuntimeState,
    StateFiles,
)
from stapes.server.instances.lxc_live import CriuLazySource, CriuSource, CriuTarget
from stapes.server.migration.policy import PrecopySettings
from stapes.server.networks.netns import bridge_ipv4_networks, interfaces_in

log = logging.getLogger(__name__)
_STATES = {
    "RUNNING": StatusCode.RUNNING, "STOPPED": StatusCode.STOPPED, "FROZEN": StatusCode.FROZEN,
    "STARTING": StatusCode.STARTING, "STOPPING": StatusCode.STOPPING, "FREEZING": StatusCode.FREEZING,
    "THAWED": StatusCode.RUNNING, "ABORTING": StatusCode.ERROR,
}
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def cgroup_v2_only() -> bool:
    return Path("/sys/fs/cgroup/cgroup.controllers").exists()


def _host_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise InternalError("cannot read the host's memory size from /proc/meminfo")


def _cpuset(value: str) -> str:
    if value.isdigit():
        count = min(int(value), os.cpu_count() or 1)
        return "0" if count == 1 else f"0-{count - 1}"
    return value


# The signals that halt and reboot each image's init (LXC's defaults suit sysvinit and systemd).
DEFAULT_SIGNALS = ("SIGPWR", "SIGINT")
HALT_SIGNALS = {"busybox": ("SIGUSR1", "SIGTERM")}


def _fstab(path: str) -> str:
    """A path in a mount entry, escaped as fstab (and LXC's getmntent) read it: spaces would split the fields."""
    return path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")


def _nic_lines(spec: InstanceSpec) -> list[str]:
    """One veth per nic, its host end on the nic's bridge, with the MAC recorded in volatile.<nic>.hwaddr."""
    if not spec.nics:
        return ["lxc.net.0.type = empty"]
    lines = []
    for index, (dev_name, bridge) in enumerate(sorted(spec.nics.items())):
        device = spec.devices[dev_name]
        prefix = f"lxc.net.{index}"
        lines += [f"{prefix}.type = veth", f"{prefix}.link = {bridge}", f"{prefix}.flags = up",
                  f"{prefix}.name = {device.get('name') or dev_name}"]
        if hwaddr := device.get("hwaddr") or spec.config.get(f"volatile.{dev_name}.hwaddr"):
            lines.append(f"{prefix}.hwaddr = {hwaddr}")
        if mtu := device.get("mtu"):
            lines.append(f"{prefix}.mtu = {mtu}")
        if host_name := device.get("host_name"):
            lines.append(f"{prefix}.veth.pair = {host_name}")
    return lines


DUMP_PID = "dump.pid"  # in the LXC directory: the lxc-checkpoint -s of the last checkpoint
DUMP_SETTLE_TIMEOUT = 600.0
HANDOVER = "handover"  # in the LXC directory of a container restored stopped: "held", then "released"
def _memory_limit(spec: InstanceSpec) -> int | None:
    """limits.memory in bytes (a share of the host's memory for a percentage); None when unset."""
    memory = spec.config.get("limits.memory")
    if not memory:
        return None
    return _host_memory() * int(memory[:-1]) // 100 if memory.endswith("%") else parse_size(memory)


ROOT_MOUNT = "rootfs"  # in the container's LXC directory: the server's id-mapped mount of an unprivileged root
VOLUME_MOUNTS = "volumes"  # beside it: one id-mapped mount per attached custom volume (hotplug.mount_dir)
CHECKPOINT_READY = "lxc.console.path = none"  # in the config a container started with: it can be checkpointed


def render_config(spec: InstanceSpec, *, lxc_dir: Path, server_id: str, cgroup2: bool, apparmor: bool) -> str:
    """The LXC configuration of one container, from its expanded config and devices (pure: unit-tested).
    `apparmor`: the host enforces AppArmor (only then is a profile named)."""
    name = spec.runtime_name
    halt, reboot = HALT_SIGNALS.get(spec.config.get("image.os", ""), DEFAULT_SIGNALS)
    lines = ["lxc.include = /usr/share/lxc/config/common.conf", f"lxc.uts.name = {spec.name}"]
    if spec.idmap:
        # Unprivileged: a user namespace, and the unshifted rootfs seen through the server's id-mapped mount.
        lines += [f"lxc.rootfs.path = dir:{lxc_dir / ROOT_MOUNT}", "lxc.include = /usr/share/lxc/config/userns.conf"]
        lines += [f"lxc.idmap = {'u' if r.uid else 'g'} {r.inside} {r.host} {r.size}" for r in spec.idmap]
    else:
        lines.append(f"lxc.rootfs.path = dir:{spec.volume / 'rootfs'}")
    lines += _nic_lines(spec)
    if apparmor:
        lines.append("lxc.apparmor.profile = unconfined")
    lines += [
        f"lxc.signal.halt = {halt}",
        f"lxc.signal.reboot = {reboot}",
        f"lxc.cgroup.dir.monitor = stapes-{server_id}.monitor.{name}",
        f"lxc.cgroup.dir.container = stapes-{server_id}.payload.{name}",
        "lxc.autodev = 1",
        # :force: with cgroup namespaces LXC leaves the cgroup mounts to the container's init, which busybox and
        # sysvinit never do; mounted here, the container sees its own limits (memory.limit_in_bytes).
        f"lxc.mount.auto = proc:mixed sys:mixed cgroup:{'rw' if spec.idmap else 'mixed'}:force",
        f"lxc.log.file = {lxc_dir / 'lxc.log'}",
        "lxc.log.level = WARN",
        CHECKPOINT_READY,
        "lxc.tty.max = 0",
        "lxc.pty.max = 1024",
        console.mount_entry(lxc_dir, _fstab),  # the server's pty as /dev/console (console.py)
    ]
    prefix = "lxc.cgroup2" if cgroup2 else "lxc.cgroup"
    config = spec.config
    if memory := config.get("limits.memory"):
        limit = _host_memory() * int(memory[:-1]) // 100 if memory.endswith("%") else parse_size(memory)
        key = "memory.max" if cgroup2 else "memory.limit_in_bytes"
        lines.append(f"{prefix}.{key} = {limit}")
    if cpu := config.get("limits.cpu"):
        lines.append(f"{prefix}.cpuset.cpus = {_cpuset(cpu)}")
    if processes := config.get("limits.processes"):
        lines.append(f"{prefix}.pids.max = {processes}")
    for dev_name, device in sorted(spec.devices.items()):
        if device.get("type") == "disk" and device.get("path") != "/":
            target = device["path"].lstrip("/")
            options = "bind,create=dir" + (",ro" if device.get("readonly") in ("true", "1") else "")
            if dev_name in spec.volumes:  # a custom volume: through the server's id-mapped mount when unprivileged
                source = (hotplug.mount_dir(lxc_dir / VOLUME_MOUNTS, dev_name) if spec.idmap
                          else spec.volumes[dev_name])
                lines.append(f"lxc.mount.entry = {_fstab(str(source))} {_fstab(target)} none {options} 0 0  "
                             f"# device {dev_name}")
                continue
            if not Path(device["source"]).is_dir():
                options = options.replace("create=dir", "create=file")
            lines.append(f"lxc.mount.entry = {_fstab(device['source'])} {_fstab(target)} none {options} 0 0  "
                         f"# device {dev_name}")
    if raw := config.get("raw.lxc"):
        lines.extend(raw.splitlines())
    return "\n".join(lines) + "\n"


STATE_MARGIN = 64 << 20  # a checkpoint's images beside its memory pages: a few MiB for a busybox container


def _fstab_field(text: str) -> str:
    return text.replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")


def config_lines(text: str, depth: int = 0) -> list[tuple[str, str]]:
    """A container's LXC configuration as (key, value) in order, with the files it includes in their place."""
    lines: list[tuple[str, str]] = []
    for line in text.splitlines():
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if key == "lxc.include" and depth < 8:
            path = Path(value)
            with contextlib.suppress(OSError):
                for part in sorted(path.glob("*.conf")) if path.is_dir() else [path]:
                    lines += config_lines(part.read_text(), depth + 1)
        elif key.startswith("lxc."):
            lines.append((key, value))
    return lines


def external_mount_keys(lines: list[tuple[str, str]]) -> set[str]:
    """The targets of the bind mounts of a container's configuration: liblxc maps exactly these on a restore
    (`--ext-mount-map <target>:<source>`), so only these may a checkpoint's external mounts name."""
    keys: set[str] = set()
    for key, value in lines:
        fields = value.split()
        if key == "lxc.mount.entry" and len(fields) >= 4 and "bind" in fields[3].split(","):
            keys.add(_fstab_field(fields[1]))
    return keys


def device_rules(lines: list[tuple[str, str]]) -> set[str] | None:
    """The devices cgroup's allow list a container's configuration gives it (LXC's cgroup v1 rules, as a
    checkpoint's devices.list holds them); None when it restricts nothing (an empty value resets the list,
    as userns.conf does)."""
    rules: set[str] | None = None
    for key, value in lines:
        if key == "lxc.cgroup.devices.deny":
            rules = set() if value == "a" else (None if not value else rules)
        elif key == "lxc.cgroup.devices.allow":
            if not value:
                rules = None
            elif rules is not None:
                rules.add(" ".join(value.split()))
    return rules


def _apply_device_rules(server_id: str, name: str, rules: set[str]) -> None:
    """A container's devices cgroup (v1) set to `rules`: everything denied, then each rule allowed. (A host
    with the unified hierarchy only has no devices cgroup: LXC's device program there is not touched.)"""
    directory = Path("/sys/fs/cgroup/devices") / f"stapes-{server_id}.payload.{name}"
    if not directory.is_dir():
        return
    try:
        (directory / "devices.deny").write_text("a")
        for rule in sorted(rules):
            (directory / "devices.allow").write_text(rule)
    except OSError as err:
        raise InternalError(f"its device rules could not be set again after the restore ({err})") from None


def host_apparmor() -> bool:
    try:
        return Path("/sys/module/apparmor/parameters/enabled").read_text().strip() == "Y"
    except OSError:
        return False


class LxcDriver(InstanceDriver):
    instance_type: ClassVar[str] = "container"
    id_mapped: ClassVar[bool] = True
    live_state_type: ClassVar[str | None] = "CRIU_RSYNC"  # Incus's type for a state sent on the criu websocket
    streamed_state: ClassVar[bool] = True  # the memory pages, while CRIU writes them (growing_state_files)
    # CRIU's memory pages: each written once, front to back (pagemap-*.img, which says where they go, is not);
    # the container's memory, so root's alone (CRIU reads them as root, before it enters the user namespace).
    growing_state_files: ClassVar[GrowingFiles | None] = GrowingFiles(re.compile(r"pages-[0-9]{1,9}\.img"), 0o600)
    # A checkpoint from a peer: CRIU's image names only (criu_images.py), root's alone like the pages.
    state_files: ClassVar[StateFiles | None] = StateFiles(criu_images.IMAGE_NAMES, 0o600)

    def __init__(self, lxc_path: Path, server_id: str) -> None:
        self.lxc_path = lxc_path
        self.server_id = server_id
        self._all_states = Coalesced(self._list_states)
        self._apparmor = host_apparmor()
        self.criu = CriuSupport(None, "", "CRIU was not probed yet")
        self._lazy: dict[str, asyncio.subprocess.Process] = {}  # lazy-pages daemons feeding restored containers
        self._dumping: dict[str, asyncio.subprocess.Process] = {}  # checkpoints in progress
        self.consoles = console.Consoles(lxc_path)

    def use_criu(self, support: CriuSupport) -> None:
        """What the daemon's probe at start found."""
        self.criu = support

    async def seal(self) -> None:
        """At start: no other user gets into a container's LXC directory, even one an older server made 0755
        (the next start of the container sets its group, see _write_config)."""
        def strip_others() -> None:
            for entry in self.lxc_path.iterdir() if self.lxc_path.is_dir() else []:
                mode = entry.lstat().st_mode
                if stat.S_ISDIR(mode) and mode & 0o007:
                    os.chmod(entry, mode & 0o770)

        await asyncio.to_thread(strip_others)

    def _dir(self, spec: InstanceSpec) -> Path:
        return self.lxc_path / spec.runtime_name

    def _tool(self, tool: str, spec: InstanceSpec, *args: str) -> list[str]:
        return [tool, "-P", str(self.lxc_path), "-n", spec.runtime_name, *args]

    async def define(self, spec: InstanceSpec) -> None:
        directory = self._dir(spec)
        text = render_config(spec, lxc_dir=directory, server_id=self.server_id, cgroup2=cgroup_v2_only(),
                             apparmor=self._apparmor)
        await asyncio.to_thread(_write_config, directory, text, _root_gid(spec))

    async def undefine(self, spec: InstanceSpec) -> None:
        directory = self._dir(spec)
        if directory.exists():
            if (await self.state(spec, detail=False)).status != StatusCode.STOPPED:  # a restore being undone
                with contextlib.suppress(TimeoutError):  # a monitor that never answers: the cgroups settle it
                    await process.run(self._tool("lxc-stop", spec, "-k"), check=False, timeout=STATE_TIMEOUT)
                await asyncio.to_thread(_kill_cgroups, self.server_id, spec.runtime_name, KILL_TIMEOUT)
            # The root mount first: removing the directory must never reach into the container's files.
            await asyncio.to_thread(idmapped.unmount, directory / ROOT_MOUNT)
            await self.consoles.close(spec)
            await asyncio.to_thread(_unmount_volumes, directory)
            await process.run(["rm", "-rf", "--one-file-system", "--", str(directory)])

    async def _mount_root(self, spec: InstanceSpec) -> None:
        for dev_name, path in spec.volumes.items():
            if path.is_symlink() or not path.is_dir():
                raise InternalError(f"Failed to start {spec.name!r}: the storage volume of disk device {dev_name!r} "
                                    f"is missing ({path})")
        if spec.idmap:
            started = time.monotonic()
            await asyncio.to_thread(idmapped.mount, spec.volume / "rootfs", self._dir(spec) / ROOT_MOUNT, spec.idmap)
            log.info("id-mapped root of %s mounted in %.3fs", spec.name, time.monotonic() - started)
            if spec.volumes:
                await asyncio.to_thread(_mount_volumes, spec, self._dir(spec))

    async def _unmount_root(self, spec: InstanceSpec) -> None:
        await asyncio.to_thread(idmapped.unmount, self._dir(spec) / ROOT_MOUNT)
        await asyncio.to_thread(_unmount_volumes, self._dir(spec))

    async def hotplug(self, old: InstanceSpec | None, new: InstanceSpec) -> None:
        """Custom volumes attached to or detached from a running container take effect at once: the server's
        mount of the volume (as at start) is attached inside the container (hotplug.py)."""
        if hotplug.plugs(old) == hotplug.plugs(new):
            return
        state = await self.state(new, detail=False)
        if state.status == StatusCode.FROZEN:
            raise BadRequest(f"Instance {new.name!r} is frozen: unfreeze it before attaching or detaching volumes")
        if state.status != StatusCode.RUNNING or state.pid <= 0:
            return

        async def mkdir(path: str) -> str:
            made = await process.run(self._tool("lxc-attach", new, "--clear-env", "--", "mkdir", "-p", path),
                                     check=False, timeout=30)
            return made.error_text if made.returncode else ""

        await hotplug.replug(old, new, pid=state.pid, mounts=self._dir(new) / VOLUME_MOUNTS, mkdir=mkdir)

    async def _mark_started(self, spec: InstanceSpec) -> None:
        """Keep the configuration the container runs with: whether it can be checkpointed depends on it."""
        directory = self._dir(spec)
        await asyncio.to_thread(shutil.copyfile, directory / "config", directory / "config.running")

    async def start(self, spec: InstanceSpec) -> None:
        root = spec.volume / "rootfs"
        if root.is_symlink() or not root.is_dir():  # never let LXC take a host directory as the root
            raise InternalError(f"Failed to start {spec.name!r}: its rootfs is not a directory in its volume")
        if spec.idmap:
            await asyncio.to_thread(_check_reachable, spec)
        await self._mount_root(spec)
        await asyncio.to_thread(_remove_stale_cgroups, self.server_id, spec.runtime_name)
        await self.consoles.prepare(spec, self._dir(spec))
        result = await process.run(self._tool("lxc-start", spec), check=False, timeout=60)
        if result.returncode != 0:
            detail = _last_errors(self._dir(spec) / "lxc.log")
            await self._unmount_root(spec)
            raise InternalError(f"Failed to start {spec.name!r}: {detail or result.error_text}")
        await self._mark_started(spec)

    async def stop(self, spec: InstanceSpec, *, timeout: float, force: bool) -> None:
        args = ["-k"] if force else ["-t", str(int(timeout))]
        result = await process.run(self._tool("lxc-stop", spec, *args), check=False, timeout=timeout + 30)
        if result.returncode != 0 and (await self.state(spec, detail=False)).status != StatusCode.STOPPED:
            raise InternalError(f"Failed to stop {spec.name!r}: {result.error_text}")
        await self._unmount_root(spec)

    async def freeze(self, spec: InstanceSpec) -> None:
        await process.run(self._tool("lxc-freeze", spec), timeout=30)

    async def unfreeze(self, spec: InstanceSpec) -> None:
        await process.run(self._tool("lxc-unfreeze", spec), timeout=30)

    async def state(self, spec: InstanceSpec, *, detail: bool) -> RuntimeState:
        if not (self._dir(spec) / "config").exists():
            return RuntimeState(StatusCode.STOPPED)
        args = ["-H", "-s", "-p"] + (["-S"] if detail else [])
        try:
            result = await process.run(self._tool("lxc-info", spec, *args), check=False, timeout=STATE_TIMEOUT)
        except TimeoutError:  # lxc-info asks the container's monitor, which may never answer
            return RuntimeState(StatusCode.ERROR, error=f"its state could not be read: lxc-info did not answer "
                                f"within {STATE_TIMEOUT:.0f}s (its LXC monitor does not respond)")
        fields: dict[str, str] = {}
        for line in result.stdout.decode(errors="replace").splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        if result.returncode != 0 or "State" not in fields:  # a failed look is no news: never "stopped"
            return RuntimeState(StatusCode.ERROR, error=f"its state could not be read: lxc-info: {result.error_text}")
        status = _STATES.get(fields["State"], StatusCode.ERROR)
        state = RuntimeState(status, pid=int(fields.get("PID", "-1") or -1))
        if detail and status == StatusCode.RUNNING:
            state.memory = {"usage": _int(fields.get("Memory use")), "usage_peak": 0}
            state.cpu = {"usage": _int(fields.get("CPU use"))}
            state.processes = await asyncio.to_thread(_count_processes, self.server_id, spec.runtime_name)
            if state.pid > 0:
                state.network = await asyncio.to_thread(interfaces_in, state.pid)
        return state

    async def states(self, specs: list[InstanceSpec]) -> dict[str, RuntimeState]:
        if not specs:
            return {}
        try:
            found = await self._all_states.get()
        except TimeoutError:
            # lxc-ls asks every container's monitor in turn: one that never answers holds up all. One by one
            # then, each bounded: that one shows as Error, the others as they are.
            log.warning("lxc-ls did not answer within %.0fs: reading each container's state on its own",
                        STATE_TIMEOUT)
            limit = asyncio.Semaphore(8)

            async def one(spec: InstanceSpec) -> RuntimeState:
                async with limit:
                    return await self.state(spec, detail=False)

            alone = await asyncio.gather(*(one(spec) for spec in specs))
            return {spec.runtime_name: state for spec, state in zip(specs, alone, strict=True)}
        states: dict[str, RuntimeState] = {}
        for spec in specs:
            status = (found or {}).get(spec.runtime_name)
            if status is None and not (self._dir(spec) / "config").exists():
                status = StatusCode.STOPPED  # not defined: it cannot run (as state() says)
            # Defined yet missing from the listing, or no listing at all (lxc-ls failed): unknown, never "stopped".
            states[spec.runtime_name] = RuntimeState(status) if status is not None else RuntimeState(
                StatusCode.ERROR, error="its state could not be read: " + (
                    "lxc-ls failed" if found is None else "lxc-ls did not list it"))
        return states

    async def _list_states(self) -> dict[str, StatusCode] | None:
        """Every container under our lxcpath, in one `lxc-ls` (shared by concurrent listings); None when lxc-ls
        failed (then nothing is known of any)."""
        result = await process.run(
            ["lxc-ls", "-P", str(self.lxc_path), "--fancy", "--fancy-format", "NAME,STATE"], check=False,
            timeout=STATE_TIMEOUT,
        )
        if result.returncode != 0:
            log.warning("lxc-ls failed: %s", result.error_text)
            return None
        found: dict[str, StatusCode] = {}
        for line in result.stdout.decode(errors="replace").splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 2:
                found[parts[0]] = _STATES.get(parts[1], StatusCode.ERROR)
        return found

    async def exec(self, spec: InstanceSpec, request: ExecRequest, stdio: tuple[Any, Any, Any]
                   ) -> asyncio.subprocess.Process:
        env = exec_environment(spec.config, request)
        argv = self._tool("lxc-attach", spec, "--clear-env", "-u", str(request.user), "-g", str(request.group))
        if request.interactive:
            # The pty on stdin becomes lxc-attach's controlling terminal (a new session): only then does
            # lxc-attach give the command a pty of the container's own, as its controlling terminal, and relay
            # window sizes (SIGWINCH) to it; typed ^C then reaches the command through that pty.
            argv = ["setsid", "--ctty", *argv]
        for key, value in env.items():
            argv += ["-v", f"{key}={value}"]
        argv.append("--")
        if request.cwd:
            # lxc-attach has no working-directory option: the container's shell changes it, then execs.
            argv += ["/bin/sh", "-c", 'cd -- "$0" && exec "$@"', request.cwd]
        argv += request.command
        stdin, stdout, stderr = stdio
        return await process.spawn(argv, stdin=stdin, stdout=stdout, stderr=stderr, cwd="/")

    exec_failure_prefix = b"lxc-attach: "  # how its report of a command it cannot execute starts

    def exec_failure(self, head: bytes, code: int) -> str | None:
        return exec_failure(head, code)

    def log_files(self, spec: InstanceSpec) -> dict[str, Path]:
        return {"lxc.log": self._dir(spec) / "lxc.log"}

    def check_volume_layout(self, volume: Path) -> None:
        """A container volume holds a real `rootfs` directory: a symlink there (from an image or a migration
        peer) would make LXC use a host directory as the container's root."""
        root = volume / "rootfs"
        if root.is_symlink() or not root.is_dir():
            raise BadRequest(f"The instance's files are not a container volume: {root.name!r} is not a directory "
                             "(a symlink or a file was received in its place)")

    def prepare_volume(self, volume: Path, name: str) -> None:
        """What the hostname template of Incus's standard images does on create, copy and move: the instance
        is called by its name inside too (Stapes does it for every image; Incus only where the image has the
        template). Resolved inside the rootfs only: a symlinked /etc never leads to the host's files."""
        root = volume / "rootfs"
        with contextlib.suppress(OSError):
            if rootfs_files.read_text(root, "etc/hostname") == name + "\n":
                return  # a moved instance keeps its files untouched
        try:
            rootfs_files.write_text(root, "etc/hostname", name + "\n")
        except OSError as err:
            log.info("not setting the hostname file of %s: %s", name, err)

    # Live migration (CRIU through lxc-checkpoint; the sessions' bytes are in lxc_live.py)
    def live_source(self, spec: InstanceSpec, directory: Path, terms: LiveTerms, *, precopy: PrecopySettings,
                    keep_running: bool) -> LiveSource:
        if terms.lazy:
            return CriuLazySource(self, spec, directory, terms)
        return CriuSource(self, spec, directory, terms, precopy)

    def live_target(self, spec: InstanceSpec, directory: Path) -> LiveTarget:
        return CriuTarget(self, spec, directory)

    async def recover_source(self, spec: InstanceSpec, directory: Path, *, complete: bool) -> bool:
        final = directory / "final"
        if not await asyncio.to_thread(final.is_dir):
            return False
        if not complete and not await self.checkpoint_outcome(spec, final):
            return False
        await self.finalize_source(spec, final, resume=True)
        return True

    async def live_refusal(self, spec: InstanceSpec) -> str | None:
        if self.criu.refusal is not None:
            return f"CRIU cannot checkpoint containers on this server ({self.criu.refusal}): move with --stateless"
        if spec.idmap and spec.nics and not self.criu.patched:
            return (f"{self.criu.binary} cannot restore an unprivileged container's network device (upstream CRIU "
                    "4.2.1 fails on it): run 'make install' to build the CRIU Stapes patches, or move with "
                    "--stateless")
        try:
            running = (self._dir(spec) / "config.running").read_text()
        except OSError:
            running = ""
        if CHECKPOINT_READY not in running:
            return (f"{spec.name!r} was started by an older Stapes, with a console CRIU cannot restore: restart it "
                    "once, or move it with --stateless")
        return None

    async def accept_refusal(self, spec: InstanceSpec) -> str | None:
        if self.criu.refusal is not None:
            return f"CRIU cannot restore containers on this server ({self.criu.refusal}): move with --stateless"
        if spec.idmap and spec.nics and not self.criu.patched:
            return (f"{self.criu.binary} cannot restore an unprivileged container's network device (upstream CRIU "
                    "4.2.1 fails on it): run 'make install' on the target to build the CRIU Stapes patches")
        # A checkpoint from a peer is checked before the restore, with CRIU's own image library.
        return await asyncio.to_thread(criu_images.missing)

    async def _checkpoint_tool(self, spec: InstanceSpec, state: Path, *args: str, config: str = "",
                               pass_fds: tuple[int, ...] = ()) -> None:
        """lxc-checkpoint, its output to a file: a restored container's monitor inherits the tool's stdout and
        stderr, so pipes would never reach end-of-file. `config`: CRIU options for this run only. `pass_fds`:
        descriptors CRIU inherits (liblxc's dump passes them on), ours to close once the tool has them."""
        restoring, stopping = "-r" in args, "-s" in args
        await asyncio.to_thread(_remove_stale_cgroups, self.server_id, spec.runtime_name)
        output = state / ("lxc-restore.out" if restoring else "lxc-dump.out")
        env = self.criu.environment()
        if restoring:
            await asyncio.to_thread(_hand_state_to_container_root, spec, state)
            if _read(self._dir(spec) / HANDOVER).strip() == "held":
                config += "leave-stopped\n"  # CRIU leaves every restored task stopped: release_restore goes on
            # liblxc maps the v1 controllers' cgroups to this server's names, not the unified hierarchy's: CRIU
            # would put the processes back into the source server's cgroup path (on one host, a live one).
            config += f"cgroup-root /stapes-{self.server_id}.payload.{spec.runtime_name}\n"
            # A process that held the console open (a getty) gets the new console's slave (console.py).
            tty, tty_fds = await asyncio.to_thread(self.consoles.restore_options, spec, state)
            config, pass_fds = config + tty, pass_fds + tty_fds
        elif stopping:
            config += await asyncio.to_thread(self.consoles.dump_options, spec)
            if (held := self.consoles.get(spec)) is not None:
                # The tool holds the console's master too: killed while the dump runs, this server takes its
                # pty along, and the dump would record the container's /dev/console as a deleted file, which
                # no restore can mount again (the restart's restore from this checkpoint).
                pass_fds = (*pass_fds, os.dup(held.master))
        if config:
            path = state / f"criu-{'restore' if restoring else 'dump'}.conf"
            path.write_text(f"{_read(self.criu.config_file) if self.criu.config_file else ''}{config}")
            env["CRIU_CONFIG_FILE"] = str(path)
        started = time.monotonic()
        try:
            with output.open("wb") as sink:
                # A process group of its own: abort_checkpoint() reaches CRIU, liblxc's child, with it.
                proc = await process.spawn(self._tool("lxc-checkpoint", spec, "-D", str(state), *args),
                                           stdin=asyncio.subprocess.DEVNULL, stdout=sink, stderr=sink, env=env,
                                           start_new_session=True, pass_fds=pass_fds)
        finally:
            for fd in pass_fds:
                os.close(fd)
        if stopping:
            self._dumping[spec.runtime_name] = proc
            # The dump outlives this server (a session of its own): a restart waits for this process to end.
            await asyncio.to_thread((self._dir(spec) / DUMP_PID).write_text, f"{proc.pid}\n")
        try:
            async with process.reaped(proc):
                code = await asyncio.wait_for(proc.wait(), 3600)
        except BaseException:
            if restoring:  # given up (a lazy tunnel broke, the move was cancelled): liblxc's child and CRIU too
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            raise
        finally:
            self._dumping.pop(spec.runtime_name, None)
        log.info("lxc-checkpoint %s of %s: exit status %d in %.3fs", " ".join(args), spec.name, code,
                 time.monotonic() - started)
        if stopping:
            await asyncio.to_thread(_remove_stale_cgroups, self.server_id, spec.runtime_name)
        if code != 0:
            detail = criu_errors(_read(state / ("restore.log" if restoring else "dump.log")))
            raise InternalError(detail or _last_errors(self._dir(spec) / "lxc.log") or _read(output).strip()[-500:]
                                or f"lxc-checkpoint exit status {code}")

    async def checkpoint_outcome(self, spec: InstanceSpec, state: Path) -> bool:
        pid = _read(self._dir(spec) / DUMP_PID).strip()
        deadline = time.monotonic() + DUMP_SETTLE_TIMEOUT
        while pid.isdigit() and _is_checkpoint_tool(int(pid), self.lxc_path, spec.runtime_name):
            if time.monotonic() > deadline:
                log.warning("the checkpoint of %s is still being written after %.0fs", spec.name,
                            DUMP_SETTLE_TIMEOUT)
                return False
            await asyncio.sleep(0.1)
        if (await self.state(spec, detail=False)).status != StatusCode.STOPPED:
            return False  # the dump failed or never ran: CRIU let it run on
        # CRIU writes its inventory last, once every image is complete; the container stopped means CRIU did not
        # let it run on (it does when the last steps fail).
        return (state / "inventory.img").is_file()

    def state_size_limit(self, spec: InstanceSpec) -> int:
        """The container's memory (limits.memory, else the host's) and a margin for the images beside it."""
        size = _memory_limit(spec) or _host_memory()
        return size + size // 8 + STATE_MARGIN

    async def check_state(self, spec: InstanceSpec, state: Path) -> None:
        text = render_config(spec, lxc_dir=self._dir(spec), server_id=self.server_id, cgroup2=cgroup_v2_only(),
                             apparmor=self._apparmor)
        lines = await asyncio.to_thread(config_lines, text)
        processes = spec.config.get("limits.processes")
        allowed = criu_images.Allowed(external_keys=external_mount_keys(lines), privileged=not spec.idmap,
                                      rootfs=spec.volume / "rootfs", memory_limit=_memory_limit(spec),
                                      processes_limit=int(processes) if processes else None,
                                      device_rules=device_rules(lines))
        await asyncio.to_thread(criu_images.check_checkpoint, state, allowed, criu_images.IMAGE_NAMES)

    def precopy_refusal(self) -> str | None:
        return self.criu.refusal or self.criu.dirty_tracking_refusal

    def lazy_refusal(self, spec: InstanceSpec) -> str | None:
        refusal = self.criu.refusal or self.criu.lazy_refusal
        if refusal is None and spec.idmap and _read(Path("/proc/sys/vm/unprivileged_userfaultfd")).strip() != "1":
            # CRIU's restorer opens the userfaultfd inside the container's user namespace.
            refusal = ("an unprivileged container's restore needs userfaultfd inside its user namespace, which this "
                       "host allows only with vm.unprivileged_userfaultfd=1 (for every user of the host: a choice "
                       "for its administrator); or run it privileged (security.privileged=true)")
        return refusal

    async def predump(self, spec: InstanceSpec, state: Path, parent: Path | None) -> MemoryRound:
        previous = [f"--predump-dir=../{parent.name}"] if parent is not None else []
        try:
            await self._checkpoint_tool(spec, state, "-p", *previous)
            stats = parse_dump_stats(await asyncio.to_thread((state / "stats-dump").read_bytes))
        except (InternalError, OSError, ValueError) as err:
            reason = err.message if isinstance(err, InternalError) else str(err)
            raise InternalError(f"CRIU could not pre-copy {spec.name!r} (it keeps running here): {reason}") \
                from None
        return MemoryRound(stats.pages_written, stats.pages_skipped_parent)

    async def checkpoint(self, spec: InstanceSpec, state: Path, parent: Path | None = None,
                         lazy_socket: socket.socket | None = None, serving: asyncio.Event | None = None) -> None:
        previous = [f"--predump-dir=../{parent.name}"] if parent is not None else []
        # Lazy: CRIU writes everything but the memory, then serves the memory on the socket it inherits (never a
        # listener) until the target took all of it, and only then ends (and the container with it). It says
        # when it starts serving on its status pipe (a byte, written just before it serves).
        lazy, watch = "", None
        fds: tuple[int, ...] = ()
        if lazy_socket is not None:
            status, ready = await _status_pipe()
            fds = (os.dup(lazy_socket.fileno()), ready)
            lazy = f"lazy-pages\nps-socket {fds[0]}\nstatus-fd {ready}\n"
            watch = asyncio.ensure_future(_set_when_ready(status, serving))
        try:
            await self._checkpoint_tool(spec, state, "-s", *previous, config=lazy, pass_fds=fds)
        except InternalError as err:
            raise InternalError(f"CRIU could not checkpoint {spec.name!r} (it keeps running here): "
                                f"{console.explain_dump_failure(spec.name, err.message)}") from None
        finally:
            if watch is not None:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)

    async def finalize_source(self, spec: InstanceSpec, state: Path, *, resume: bool) -> None:
        if not resume:
            await self._unmount_root(spec)
            return
        await self._mount_root(spec)
        if self.consoles.get(spec) is None:
            await self.consoles.prepare(spec, self._dir(spec))
        try:
            await self._checkpoint_tool(spec, state, "-r")
        except InternalError as err:
            raise InternalError(f"{spec.name!r} could not be restored on the source either: {err.message}; "
                                f"'stapes start {spec.name}' boots it afresh") from None
        try:
            await self._restrict_devices(spec)
        except InternalError as err:  # it runs again, as before the move: say so, never lose it for this
            log.error("%s runs again on the source, but its device rules could not be set again: %s", spec.name,
                      err.message)
        await self._mark_started(spec)

    async def restore(self, spec: InstanceSpec, state: Path, lazy_socket: socket.socket | None = None) -> None:
        await self._mount_root(spec)
        await self.consoles.prepare(spec, self._dir(spec))
        try:
            if lazy_socket is not None:
                await self._start_lazy_pages(spec, state, lazy_socket)
            await self._checkpoint_tool(spec, state, "-r", config="lazy-pages\n" if lazy_socket is not None else "")
            await self._restrict_devices(spec)
        except InternalError as err:
            raise InternalError(f"CRIU could not restore {spec.name!r} here: {err.message}") from None
        await self._mark_started(spec)

    async def _restrict_devices(self, spec: InstanceSpec) -> None:
        """After a restore: CRIU leaves the container's devices cgroup open to every device ("a *:* rwm", a
        host disk included, whatever its checkpoint said); its configuration's rules are set again."""
        text = render_config(spec, lxc_dir=self._dir(spec), server_id=self.server_id, cgroup2=cgroup_v2_only(),
                             apparmor=self._apparmor)
        rules = device_rules(await asyncio.to_thread(config_lines, text))
        if rules is not None:
            await asyncio.to_thread(_apply_device_rules, self.server_id, spec.runtime_name, rules)

    async def hold_restore(self, spec: InstanceSpec) -> None:
        await asyncio.to_thread(_write_durably, self._dir(spec) / HANDOVER, "held\n")

    async def release_restore(self, spec: InstanceSpec) -> None:
        marker = self._dir(spec) / HANDOVER
        await asyncio.to_thread(_write_durably, marker, "released\n")  # before it runs: a restart keeps it
        pid = (await self.state(spec, detail=False)).pid
        if pid <= 0:
            raise InternalError(f"The restored {spec.name!r} is not running here any more")
        resumed = await asyncio.to_thread(_continue_tree, pid)
        log.info("%s released: %d restored processes go on", spec.name, resumed)

    async def restore_released(self, spec: InstanceSpec) -> bool:
        if _read(self._dir(spec) / HANDOVER).strip() != "released":
            return False
        await self.release_restore(spec)  # the server may have stopped before the processes went on
        return True

    async def _start_lazy_pages(self, spec: InstanceSpec, state: Path, sock: socket.socket) -> None:
        """CRIU's lazy-pages daemon: it feeds the restored container's memory from the source's page server at
        the far end of `sock` (which it inherits: the migration's tunnel to the source, no listener), on demand
        and then in the background. The restore reaches it through lazy-pages.socket in `state` (a directory
        only root can reach), which it has bound once it writes its status byte: the restore waits for that."""
        assert self.criu.binary is not None
        # It sends its page requests without waiting (MSG_DONTWAIT): room for many while the tunnel is busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        status, ready = await _status_pipe()
        fd = os.dup(sock.fileno())
        try:
            with (state / "lazy-pages.out").open("wb") as log_file:
                proc = await process.spawn(
                    [str(self.criu.binary), "lazy-pages", "--page-server", "--ps-socket", str(fd),
                     "--status-fd", str(ready), "-D", str(state), "-o", "lazy-pages.log"],
                    stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=self.criu.environment(),
                    pass_fds=(fd, ready))
        except BaseException:
            status.close()
            raise
        finally:
            os.close(fd)
            os.close(ready)
        self._lazy[spec.runtime_name] = proc
        try:
            async with asyncio.timeout(LAZY_START_TIMEOUT):
                started = await status.read(1)
        except TimeoutError:
            started = b""
        finally:
            status.close()
        if not started:
            detail = criu_errors(_read(state / "lazy-pages.log"))
            raise InternalError(f"CRIU's lazy-pages daemon did not start: {detail or 'no word from it'}")

    async def _renew_moved_leases(self, spec: InstanceSpec) -> None:
        """A container moved live keeps the IPv4 address it had on the source's network. Where its bridge here has
        another subnet, that address is unreachable until the lease renews (an hour later): its DHCP client is
        told at once to release the old lease and take one here (busybox's udhcpc: SIGUSR2, then SIGUSR1)."""
        if not spec.nics:
            return
        pid = (await self.state(spec, detail=False)).pid
        inside = await asyncio.to_thread(interfaces_in, pid) if pid > 0 else None
        stale = []
        for dev_name, bridge in sorted(spec.nics.items()):
            iface = spec.devices[dev_name].get("name") or dev_name
            here = await asyncio.to_thread(bridge_ipv4_networks, bridge)
            addresses = [ipaddress.ip_interface(f"{a['address']}/{a['netmask']}")
                         for a in (inside or {}).get(iface, {}).get("addresses", []) if a["family"] == "inet"]
            if here and addresses and not any(a.ip in net for a in addresses for net in here):
                stale.append(f"{iface} has {', '.join(map(str, addresses))}, {bridge} here is "
                             f"{', '.join(map(str, here))}")
        if not stale:
            return
        clients = await asyncio.to_thread(_renew_dhcp, self.server_id, spec.runtime_name)
        if clients:
            log.info("%s moved to another subnet (%s): its DHCP client takes a lease here now", spec.name,
                     "; ".join(stale))
        else:
            log.warning("%s moved to another subnet (%s) and runs no DHCP client Stapes knows (udhcpc): it keeps "
                        "its old address until its lease renews; renew it in the container", spec.name,
                        "; ".join(stale))

    async def abort_checkpoint(self, spec: InstanceSpec) -> None:
        """SIGTERM to CRIU while its lazy dump waits for the target: the dump fails and CRIU lets the
        container run on (it still holds all its memory)."""
        proc = self._dumping.get(spec.runtime_name)
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)

    async def memory_arrived(self, spec: InstanceSpec) -> None:
        proc = self._lazy.get(spec.runtime_name)
        if proc is None:
            return
        try:
            code = await proc.wait()
        finally:
            self._lazy.pop(spec.runtime_name, None)
            process.forget(proc)
        if code != 0:
            raise InternalError(f"The memory of {spec.name!r} did not all arrive (CRIU lazy-pages exit status {code})")

    async def finalize_target(self, spec: InstanceSpec, *, success: bool) -> None:
        if success:
            await self._renew_moved_leases(spec)
            return
        lazy = self._lazy.pop(spec.runtime_name, None)
        if lazy is not None and lazy.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                lazy.kill()
            await lazy.wait()
            process.forget(lazy)
        if (await self.state(spec, detail=False)).status != StatusCode.STOPPED:
            with contextlib.suppress(TimeoutError):  # a monitor that does not answer: the cgroups settle it
                await process.run(self._tool("lxc-stop", spec, "-k"), check=False, timeout=STATE_TIMEOUT)
        # Whatever a half-done restore left (tasks waiting for pages that never come, a monitor that never
        # answers) is killed through the container's cgroups: nothing of it may outlive a failed move.
        killed = await asyncio.to_thread(_kill_cgroups, self.server_id, spec.runtime_name, KILL_TIMEOUT)
        if killed:
            log.warning("%s: killed %d processes a failed restore left", spec.name, killed)
        await asyncio.to_thread(_remove_stale_cgroups, self.server_id, spec.runtime_name)
        await self._unmount_root(spec)


LAZY_START_TIMEOUT = 30.0  # for CRIU's lazy-pages daemon to bind its socket
STATE_TIMEOUT = 10.0  # for lxc-info or lxc-ls (milliseconds when the monitors answer)
KILL_TIMEOUT = 10.0  # for the processes of a container's cgroups to be gone once killed


def _renew_dhcp(server_id: str, name: str) -> int:
    """Busybox's udhcpc in the container: release (SIGUSR2), then renew (SIGUSR1), which from the released
    state asks for a new lease at once. How many clients were told."""
    told = 0
    pids: set[int] = set()
    for directory in _cgroup_dirs(server_id, name):
        if ".payload." in directory.as_posix():
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(pid) for pid in (directory / "cgroup.procs").read_text().split())
    for pid in sorted(pids):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() != "udhcpc":
                continue
            os.kill(pid, signal.SIGUSR2)
            time.sleep(0.2)
            os.kill(pid, signal.SIGUSR1)
            told += 1
    return told


def _cgroup_dirs(server_id: str, name: str) -> list[Path]:
    """The container's payload and monitor cgroups (and those below them) in every hierarchy."""
    roots = [Path("/sys/fs/cgroup")]
    with contextlib.suppress(OSError):
        roots += [p for p in Path("/sys/fs/cgroup").iterdir() if p.is_dir() and not p.name.startswith("stapes-")]
    found = []
    for root in roots:
        for kind in ("payload", "monitor"):
            top = root / f"stapes-{server_id}.{kind}.{name}"
            with contextlib.suppress(OSError):
                if top.is_dir():
                    found += [top, *(p for p in top.rglob("*") if p.is_dir())]
    return found


def _kill_cgroups(server_id: str, name: str, timeout: float) -> int:
    """SIGKILL every process in the container's cgroups (thawed first: a frozen task never dies) until none is
    left or `timeout` passed; how many were killed."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        directories = _cgroup_dirs(server_id, name)
        pids: set[int] = set()
        for directory in directories:
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(pid) for pid in (directory / "cgroup.procs").read_text().split())
        pids.discard(os.getpid())
        if not pids or time.monotonic() > deadline:
            return len(killed)
        for directory in directories:
            for control, thawed in (("freezer.state", "THAWED"), ("cgroup.freeze", "0")):
                with contextlib.suppress(OSError):
                    (directory / control).write_text(thawed)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        time.sleep(0.05)


class _StatusPipe:
    """Our end of the pipe a CRIU command writes one byte into once it is ready (its --status-fd)."""

    def __init__(self, reader: asyncio.StreamReader, transport: asyncio.BaseTransport) -> None:
        self._reader = reader
        self._transport = transport

    async def read(self, size: int) -> bytes:
        return await self._reader.read(size)

    def close(self) -> None:
        self._transport.close()


async def _status_pipe() -> tuple[_StatusPipe, int]:
    """A status pipe: ours to read without blocking, and the descriptor CRIU inherits (ours to close)."""
    read_fd, write_fd = os.pipe()
    reader = asyncio.StreamReader()
    try:
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", 0))
    except BaseException:
        os.close(write_fd)
        raise
    return _StatusPipe(reader, transport), write_fd


async def _set_when_ready(status: _StatusPipe, ready: asyncio.Event | None) -> None:
    try:
        if await status.read(1) and ready is not None:
            ready.set()
    finally:
        status.close()


_CRIU_NOISE = ("RLIMIT_NOFILE", "iptables", "ip6tables", "Address already assigned", "address already assigned")


def criu_errors(log: str) -> str:
    """What CRIU's log says went wrong: its first error (the cause) and, when different, its last (pure:
    unit-tested). Lines about tools this host lacks and is not using (iptables) are noise."""
    errors = []
    for line in log.splitlines():
        if "Error" not in line or any(noise in line for noise in _CRIU_NOISE):
            continue
        errors.append(line.split("): ", 1)[-1].strip() if "): " in line else line.strip())
    if not errors:
        return ""
    return errors[0] if len(errors) == 1 or errors[0] == errors[-1] else f"{errors[0]} / {errors[-1]}"


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-200_000:]
    except OSError:
        return ""


# What lxc-attach's child writes (to the command's stderr or pty) when the command cannot be executed.
_ATTACH_EXEC_FAILED = re.compile(rb"lxc-attach: [^\n]*Failed to exec ")
_EXEC_FAILURES = {127: "Command not found", 126: "Command not executable"}


def exec_failure(head: bytes, code: int) -> str | None:
    """Incus's words for a command lxc-attach could not execute (exit status 127 or 126), when `head`, the
    first output, is lxc-attach's own message about it (pure: unit-tested)."""
    if code in _EXEC_FAILURES and _ATTACH_EXEC_FAILED.match(head.lstrip(b"\r\n")):
        return _EXEC_FAILURES[code]
    return None


def exec_environment(config: Mapping[str, str], request: ExecRequest) -> dict[str, str]:
    """Incus's defaults, then the instance's environment.* keys, then what the caller asked for."""
    env = {"PATH": DEFAULT_PATH, "HOME": "/root" if request.user == 0 else "/", "LANG": "C.UTF-8"}
    if request.interactive:
        env["TERM"] = "xterm"
    env.update({k.removeprefix("environment."): v for k, v in config.items() if k.startswith("environment.")})
    env.update(request.environment)
    for key in env:
        if not key or "=" in key:
            raise BadRequest(f"Invalid environment variable name {key!r}")
    return env


def _hand_state_to_container_root(spec: InstanceSpec, state: Path) -> None:
    """CRIU's restore reads some images inside the container's user namespace, as the container's root (the
    pages), others as host root without its capabilities (the time namespace, of a container restored before):
    an unprivileged container's checkpoint (and the pre-copy rounds beside it) becomes root's with the
    container's root group, 0640 (0750 for directories), in the migration's root-only working directory; no
    other host user reads it. No link is followed."""
    gid = _root_gid(spec)
    if not gid:
        return
    for directory in [state, *(state.parent.glob("predump-*"))]:
        for top, dirs, files in os.walk(directory):
            os.lchown(top, 0, gid)
            os.chmod(top, 0o750)
            for name in files:
                path = os.path.join(top, name)
                if not os.path.islink(path):
                    os.lchown(path, 0, gid)
                    os.chmod(path, 0o640)
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(top, d))]


def _is_checkpoint_tool(pid: int, lxc_path: Path, name: str) -> bool:
    """`pid` is still an lxc-checkpoint of this container under this lxcpath (not a reused pid)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return argv[:5] == [b"lxc-checkpoint", b"-P", str(lxc_path).encode(), b"-n", name.encode()]


def _write_durably(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}")
    with temporary.open("w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    temporary.replace(path)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _continue_tree(init: int) -> int:
    """SIGCONT to a restored container's init and every process below it (orphans inside are reparented to
    that init, so the tree is the whole container); returns how many."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    pending, count = [init], 0
    while pending:
        pid = pending.pop()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
            count += 1
        pending.extend(children.get(pid, []))
    return count


def _root_gid(spec: InstanceSpec) -> int:
    """The host gid of the container's root group (0 for a privileged container)."""
    return next((r.host - r.inside for r in spec.idmap if r.gid and r.inside <= 0 < r.inside + r.size), 0)


def _write_config(directory: Path, text: str, root_gid: int) -> None:
    """The container's LXC directory holds its config, its log and (unprivileged) the id-mapped view of its
    files: root's, and traversable by the container's root group alone, which LXC's setup in the user namespace
    needs to reach that view; no other host user gets in (docs/security.md)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chown(directory, 0, root_gid)
    os.chmod(directory, 0o710 if root_gid else 0o700)
    tmp = directory / "config.tmp"
    tmp.write_text(text)
    tmp.replace(directory / "config")


def _int(value: str | None) -> int:
    try:
        return int((value or "0").split()[0])
    except ValueError:
        return 0


def _remove_stale_cgroups(server_id: str, name: str) -> None:
    """The empty cgroups a container left (LXC does not remove an unprivileged container's after a checkpoint
    stopped it, nor a monitor's after a failed start); they would stop it from starting or restoring again.
    Cgroups that still hold processes stay (rmdir refuses them)."""
    roots = [Path("/sys/fs/cgroup")]
    with contextlib.suppress(OSError):
        roots += [p for p in Path("/sys/fs/cgroup").iterdir() if p.is_dir() and not p.name.startswith("stapes-")]
    for root in roots:
        for kind in ("payload", "monitor"):
            top = root / f"stapes-{server_id}.{kind}.{name}"
            # LXC's monitor may be removing the same directories right now: whatever vanishes is fine.
            with contextlib.suppress(OSError):
                inner = [p for p in top.rglob("*") if p.is_dir()] if top.is_dir() else []
                for directory in [*sorted(inner, key=lambda p: -len(p.parts)), top]:
                    with contextlib.suppress(OSError):
                        directory.rmdir()


def _count_processes(server_id: str, name: str) -> int:
    for candidate in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
        procs = candidate / f"stapes-{server_id}.payload.{name}" / "cgroup.procs"
        try:
            return len(procs.read_text().split())
        except OSError:
            continue
    return -1


def _check_reachable(spec: InstanceSpec) -> None:
    """An unprivileged container's root (a high host uid) must be able to walk to the sources of its disk
    devices; LXC's own error for this says only that the container failed to spawn. (Its own files it sees
    through the server's id-mapped mount in its LXC directory: their volume stays root's alone.)"""
    paths = {}
    for name, device in spec.devices.items():
        if device.get("type") == "disk" and device.get("source") and name not in spec.volumes:
            paths[f"the source of disk device {name!r}"] = Path(device["source"])
    for what, path in paths.items():
        closed = _untraversable_parent(path)
        if closed is not None:
            raise InternalError(
                f"Failed to start {spec.name!r}: {closed} is mode {closed.stat().st_mode & 0o777:04o}, so the "
                f"container's root (host uid {spec.idmap[0].host}) cannot reach {what}: 'chmod o+x {closed}' "
                "(0711 is enough), or run it privileged (security.privileged=true)")


def _mount_volumes(spec: InstanceSpec, lxc_dir: Path) -> None:
    """Each attached custom volume id-mapped below the container's LXC directory, as its root is: the files
    stay unshifted in the pool (whose directories stay root's alone), and show with their owners inside."""
    mounts = lxc_dir / VOLUME_MOUNTS
    mounts.mkdir(mode=0o711, exist_ok=True)
    for dev_name, path in sorted(spec.volumes.items()):
        idmapped.mount(path, hotplug.mount_dir(mounts, dev_name), spec.idmap)


def _unmount_volumes(lxc_dir: Path) -> None:
    mounts = lxc_dir / VOLUME_MOUNTS
    if not mounts.is_dir():
        return
    for entry in sorted(mounts.iterdir()):
        idmapped.unmount(entry)
        with contextlib.suppress(OSError):
            entry.rmdir()


def _untraversable_parent(path: Path) -> Path | None:
    """The first directory above `path` that others may not enter (a `mktemp -d` one is 0700)."""
    for parent in path.parents:
        with contextlib.suppress(OSError):
            if not parent.stat().st_mode & 0o001:
                return parent
    return None


def _last_errors(log: Path) -> str:
    """What LXC logged for the failed start: the first ERROR among the log's last lines (the root cause) and
    the last (how it ended), e.g. 'Failed to mount ... / Failed to spawn container "c1"'."""
    try:
        lines = log.read_text(errors="replace").splitlines()[-60:]
    except OSError:
        return ""
    errors = [line.split(" - ", 1)[-1] for line in lines if " ERROR " in line]
    if not errors:
        return ""
    return errors[0] if len(errors) == 1 else f"{errors[0]} / {errors[-1]}"
