"""System containers through LXC's own tools (lxc-start, lxc-stop, lxc-info, lxc-attach, lxc-checkpoint).

The tools are spawned asynchronously, so nothing blocks the event loop, and each server passes its own
lxcpath (`-P`) and cgroup directory names, so two servers on one host never collide.

Live migration goes through `lxc-checkpoint` (liblxc drives CRIU: cgroups, veths, the rootfs). What a
checkpoint needs from a container is decided when it starts: no console pty (`lxc.console.path = none`:
liblxc cannot hand a restored container its console), no AppArmor line on a host without AppArmor (CRIU's
restore fails on it), and an unprivileged root mounted id-mapped by the server itself (see idmapped.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from stapes.api.config_keys import parse_size
from stapes.api.errors import BadRequest, InternalError
from stapes.api.status import StatusCode
from stapes.server import process
from stapes.server.coalesce import Coalesced
from stapes.server.instances import idmapped
from stapes.server.instances.criu import CriuSupport, parse_dump_stats
from stapes.server.instances.driver import (
    ExecRequest,
    GrowingFiles,
    InstanceDriver,
    InstanceSpec,
    MemoryRound,
    RuntimeState,
)
from stapes.server.networks.netns import interfaces_in

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


ROOT_MOUNT = "rootfs"  # in the container's LXC directory: the server's id-mapped mount of an unprivileged root
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
            if not Path(device["source"]).is_dir():
                options = options.replace("create=dir", "create=file")
            lines.append(f"lxc.mount.entry = {_fstab(device['source'])} {_fstab(target)} none {options} 0 0  "
                         f"# device {dev_name}")
    if raw := config.get("raw.lxc"):
        lines.extend(raw.splitlines())
    return "\n".join(lines) + "\n"


def host_apparmor() -> bool:
    try:
        return Path("/sys/module/apparmor/parameters/enabled").read_text().strip() == "Y"
    except OSError:
        return False


class LxcDriver(InstanceDriver):
    instance_type: ClassVar[str] = "container"
    # CRIU's memory pages: each written once, front to back (pagemap-*.img, which says where they go, is not);
    # CRIU makes every image 0644.
    growing_state_files: ClassVar[GrowingFiles | None] = GrowingFiles(re.compile(r"pages-[0-9]{1,9}\.img"), 0o644)

    def __init__(self, lxc_path: Path, server_id: str) -> None:
        self.lxc_path = lxc_path
        self.server_id = server_id
        self._all_states = Coalesced(self._list_states)
        self._apparmor = host_apparmor()
        self.criu = CriuSupport(None, "", "CRIU was not probed yet")
        self._lazy: dict[str, asyncio.subprocess.Process] = {}  # lazy-pages daemons feeding restored containers
        self._dumping: dict[str, asyncio.subprocess.Process] = {}  # checkpoints in progress

    def use_criu(self, support: CriuSupport) -> None:
        """What the daemon's probe at start found."""
        self.criu = support

    def _dir(self, spec: InstanceSpec) -> Path:
        return self.lxc_path / spec.runtime_name

    def _tool(self, tool: str, spec: InstanceSpec, *args: str) -> list[str]:
        return [tool, "-P", str(self.lxc_path), "-n", spec.runtime_name, *args]

    async def define(self, spec: InstanceSpec) -> None:
        directory = self._dir(spec)
        text = render_config(spec, lxc_dir=directory, server_id=self.server_id, cgroup2=cgroup_v2_only(),
                             apparmor=self._apparmor)
        await asyncio.to_thread(_write_config, directory, text)

    async def undefine(self, spec: InstanceSpec) -> None:
        directory = self._dir(spec)
        if directory.exists():
            if (await self.state(spec, detail=False)).status != StatusCode.STOPPED:  # a restore being undone
                await process.run(self._tool("lxc-stop", spec, "-k"), check=False, timeout=60)
            # The root mount first: removing the directory must never reach into the container's files.
            await asyncio.to_thread(idmapped.unmount, directory / ROOT_MOUNT)
            await process.run(["rm", "-rf", "--one-file-system", "--", str(directory)])

    async def _mount_root(self, spec: InstanceSpec) -> None:
        if spec.idmap:
            started = time.monotonic()
            await asyncio.to_thread(idmapped.mount, spec.volume / "rootfs", self._dir(spec) / ROOT_MOUNT, spec.idmap)
            log.info("id-mapped root of %s mounted in %.3fs", spec.name, time.monotonic() - started)

    async def _unmount_root(self, spec: InstanceSpec) -> None:
        await asyncio.to_thread(idmapped.unmount, self._dir(spec) / ROOT_MOUNT)

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
        result = await process.run(self._tool("lxc-info", spec, *args), check=False, timeout=30)
        fields: dict[str, str] = {}
        for line in result.stdout.decode(errors="replace").splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        status = _STATES.get(fields.get("State", "STOPPED"), StatusCode.ERROR)
        state = RuntimeState(status, pid=int(fields.get("PID", "-1") or -1))
        if detail and status == StatusCode.RUNNING:
            state.memory = {"usage": _int(fields.get("Memory use")), "usage_peak": 0}
            state.cpu = {"usage": _int(fields.get("CPU use"))}
            state.processes = await asyncio.to_thread(_count_processes, self.server_id, spec.runtime_name)
            if state.pid > 0:
                state.network = await asyncio.to_thread(interfaces_in, state.pid)
        return state

    async def states(self, specs: list[InstanceSpec]) -> dict[str, StatusCode]:
        if not specs:
            return {}
        found = await self._all_states.get()
        return {spec.runtime_name: found.get(spec.runtime_name, StatusCode.STOPPED) for spec in specs}

    async def _list_states(self) -> dict[str, StatusCode]:
        """Every container under our lxcpath, in one `lxc-ls` (shared by concurrent listings)."""
        result = await process.run(
            ["lxc-ls", "-P", str(self.lxc_path), "--fancy", "--fancy-format", "NAME,STATE"], check=False, timeout=60
        )
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
        for key, value in env.items():
            argv += ["-v", f"{key}={value}"]
        argv.append("--")
        if request.cwd:
            # lxc-attach has no working-directory option: the container's shell changes it, then execs.
            argv += ["/bin/sh", "-c", 'cd -- "$0" && exec "$@"', request.cwd]
        argv += request.command
        stdin, stdout, stderr = stdio
        return await process.spawn(argv, stdin=stdin, stdout=stdout, stderr=stderr, cwd="/",
                                   start_new_session=request.interactive)

    def log_files(self, spec: InstanceSpec) -> dict[str, Path]:
        return {"lxc.log": self._dir(spec) / "lxc.log"}

    # Live migration (CRIU through lxc-checkpoint)
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
        return None

    async def _checkpoint_tool(self, spec: InstanceSpec, state: Path, *args: str, config: str = "") -> None:
        """lxc-checkpoint, its output to a file: a restored container's monitor inherits the tool's stdout and
        stderr, so pipes would never reach end-of-file. `config`: CRIU options for this run only."""
        restoring, stopping = "-r" in args, "-s" in args
        await asyncio.to_thread(_remove_stale_cgroups, self.server_id, spec.runtime_name)
        output = state / ("lxc-restore.out" if restoring else "lxc-dump.out")
        env = self.criu.environment()
        if restoring:
            # liblxc maps the v1 controllers' cgroups to this server's names, not the unified hierarchy's: CRIU
            # would put the processes back into the source server's cgroup path (on one host, a live one).
            config += f"cgroup-root /stapes-{self.server_id}.payload.{spec.runtime_name}\n"
        if config:
            path = state / f"criu-{'restore' if restoring else 'dump'}.conf"
            path.write_text(f"{_read(self.criu.config_file) if self.criu.config_file else ''}{config}")
            env["CRIU_CONFIG_FILE"] = str(path)
        started = time.monotonic()
        with output.open("wb") as sink:
            # A process group of its own: abort_checkpoint() reaches CRIU, liblxc's child, with it.
            proc = await process.spawn(self._tool("lxc-checkpoint", spec, "-D", str(state), *args),
                                       stdin=asyncio.subprocess.DEVNULL, stdout=sink, stderr=sink, env=env,
                                       start_new_session=True)
        if stopping:
            self._dumping[spec.runtime_name] = proc
        try:
            async with process.reaped(proc):
                code = await asyncio.wait_for(proc.wait(), 3600)
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
                         lazy_port: int | None = None) -> None:
        previous = [f"--predump-dir=../{parent.name}"] if parent is not None else []
        # Lazy: CRIU writes everything but the memory, then serves the memory on 127.0.0.1:lazy_port until the
        # target took all of it, and only then ends (and the container with it).
        lazy = f"lazy-pages\naddress 127.0.0.1\nport {lazy_port}\n" if lazy_port is not None else ""
        try:
            await self._checkpoint_tool(spec, state, "-s", *previous, config=lazy)
        except InternalError as err:
            raise InternalError(f"CRIU could not checkpoint {spec.name!r} (it keeps running here): {err.message}") \
                from None

    async def finalize_source(self, spec: InstanceSpec, state: Path, *, resume: bool) -> None:
        if not resume:
            await self._unmount_root(spec)
            return
        await self._mount_root(spec)
        try:
            await self._checkpoint_tool(spec, state, "-r")
        except InternalError as err:
            raise InternalError(f"{spec.name!r} could not be restored on the source either: {err.message}; "
                                f"'stapes start {spec.name}' boots it afresh") from None
        await self._mark_started(spec)

    async def restore(self, spec: InstanceSpec, state: Path, lazy_port: int | None = None) -> None:
        await self._mount_root(spec)
        try:
            if lazy_port is not None:
                await self._start_lazy_pages(spec, state, lazy_port)
            await self._checkpoint_tool(spec, state, "-r", config="lazy-pages\n" if lazy_port is not None else "")
        except InternalError as err:
            raise InternalError(f"CRIU could not restore {spec.name!r} here: {err.message}") from None
        await self._mark_started(spec)

    async def _start_lazy_pages(self, spec: InstanceSpec, state: Path, port: int) -> None:
        """CRIU's lazy-pages daemon: it feeds the restored container's memory from the page server it reaches
        on 127.0.0.1:port (the migration's tunnel to the source), on demand and then in the background."""
        assert self.criu.binary is not None
        log_file = (state / "lazy-pages.out").open("wb")
        try:
            proc = await process.spawn(
                [str(self.criu.binary), "lazy-pages", "--page-server", "--address", "127.0.0.1", "--port", str(port),
                 "-D", str(state), "-o", "lazy-pages.log"], stdin=asyncio.subprocess.DEVNULL, stdout=log_file,
                stderr=log_file, env=self.criu.environment())
        finally:
            log_file.close()
        self._lazy[spec.runtime_name] = proc

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
            return
        lazy = self._lazy.pop(spec.runtime_name, None)
        if lazy is not None and lazy.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                lazy.kill()
            await lazy.wait()
            process.forget(lazy)
        if (await self.state(spec, detail=False)).status != StatusCode.STOPPED:
            await process.run(self._tool("lxc-stop", spec, "-k"), check=False, timeout=60)
        await self._unmount_root(spec)


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


def _write_config(directory: Path, text: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
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
    """An unprivileged container's root (a high host uid) must be able to walk to its rootfs and to the sources
    of its disk devices; LXC's own error for this says only that the container failed to spawn."""
    volume = spec.volume
    if not volume.stat().st_mode & 0o001:
        # The volume directory is the server's own (the rootfs inside it is the container's): a peer may have
        # sent it as 0100 (Incus's mode for its container directories, which it chowns to the mapped root).
        volume.chmod(volume.stat().st_mode & 0o7777 | 0o011)
    paths = {"its files": volume / "rootfs"}
    for name, device in spec.devices.items():
        if device.get("type") == "disk" and device.get("source"):
            paths[f"the source of disk device {name!r}"] = Path(device["source"])
    for what, path in paths.items():
        closed = _untraversable_parent(path)
        if closed is not None:
            raise InternalError(
                f"Failed to start {spec.name!r}: {closed} is mode {closed.stat().st_mode & 0o777:04o}, so the "
                f"container's root (host uid {spec.idmap[0].host}) cannot reach {what}: 'chmod o+x {closed}' "
                "(0711 is enough), or run it privileged (security.privileged=true)")


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
