"""stapesd: wiring only. Config -> store -> drivers -> services -> REST, plus the listeners."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

from stapes import __version__
from stapes.api.config_keys import validate_server_config
from stapes.api.errors import BadRequest, NotFound
from stapes.certs import ensure_certificate, fingerprint_pem
from stapes.server import logfile, process, tls
from stapes.server.auth import TrustStore
from stapes.server.events import EventHub
from stapes.server.images.busybox import build_busybox_image
from stapes.server.images.busybox_vm import build_busybox_vm_image
from stapes.server.images.store import ImageStore
from stapes.server.instances import accel, criu
from stapes.server.instances.backups import BackupService
from stapes.server.instances.driver import InstanceDriver
from stapes.server.instances.lxc import LxcDriver
from stapes.server.instances.qemu import QemuDriver
from stapes.server.instances.service import InstanceService
from stapes.server.migration.service import MigrationService
from stapes.server.migration.volumes import VolumeMigration
from stapes.server.networks.service import DEFAULT_NETWORK, NetworkService
from stapes.server.operations import OperationRegistry
from stapes.server.paths import StatePaths
from stapes.server.rest.app import build_app
from stapes.server.storage.service import StorageService
from stapes.server.storage.volumes import VolumeService
from stapes.server.store.db import ProfileRow, ProjectRow, Store

log = logging.getLogger("stapesd")


class Daemon:
    def __init__(self, paths: StatePaths, store: Store) -> None:
        self.paths = paths
        self.store = store
        self.events = EventHub()
        self.operations = OperationRegistry(self.events)
        self.trust = TrustStore(store)
        self.storage = StorageService(store, paths)
        self.images = ImageStore(store, paths.images)
        self.images.builtins["busybox-vm"] = (
            build_busybox_vm_image, "Built-in tiny VM image (a Debian kernel, busybox, the Stapes agent)")
        self.networks = NetworkService(store, paths)
        self.lxc = LxcDriver(paths.lxc_path, paths.server_id)
        drivers: dict[str, InstanceDriver] = {"container": self.lxc}
        # Virtual machines where QEMU and its UEFI firmware are installed; the accelerator is probed at serve().
        self.qemu_host = accel.find_qemu()
        self.qemu: QemuDriver | None = None
        self.vm_accelerator = accel.Accelerator("", self.qemu_host.refusal or "not probed yet")
        if self.qemu_host.refusal is None:
            self.qemu = QemuDriver(paths.root / "qemu", paths.root, paths.server_id, self.qemu_host)
            drivers["virtual-machine"] = self.qemu
        self.instances = InstanceService(store, self.storage, self.images, self.events, drivers, self.networks)
        self.migration = MigrationService(self.instances, paths)
        self.backups = BackupService(store, self.instances, self.storage, paths.root)
        self.instances.on_removed.append(self.backups.instance_removed)
        self.volumes = VolumeService(store, self.storage, self.instances)
        self.volume_migration = VolumeMigration(self.volumes, self.migration)
        self.certificate_pem = paths.server_cert.read_text()
        self.certificate_fingerprint = fingerprint_pem(self.certificate_pem)
        self.lxc_version = ""
        self._runner: web.AppRunner | None = None
        self._https_site: web.TCPSite | None = None
        self._https_address = ""
        self._reaper = process.ChildReaper()

    async def initialise(self) -> None:
        """First start: default project, pool, profile and the built-in image. Later starts: nothing."""
        await asyncio.to_thread(make_private_directories, self.paths)
        await self.trust.load()
        if not await self.store.projects():
            await self.store.create_project(ProjectRow("default", "Default project"))
        if not await self.store.pools():
            await self.storage.create("default", "dir", {}, "Default storage pool")
        try:
            await self.store.profile("default")
        except NotFound:
            devices: dict[str, dict[str, str]] = {"root": {"type": "disk", "path": "/", "pool": "default"}}
            try:  # as `incus admin init --auto`: a bridge with DHCP and NAT, and a nic on it for every instance
                await self.networks.create(DEFAULT_NETWORK, "bridge", {}, "Default network")
                devices["eth0"] = {"type": "nic", "network": DEFAULT_NETWORK, "name": "eth0"}
            except Exception as err:
                log.warning("could not create the default network %s (instances get no nic): %s",
                            DEFAULT_NETWORK, err)
            await self.store.create_profile(ProfileRow("default", "Default profile", {}, devices))
        if "busybox" not in await self.store.aliases():
            upload = self.paths.images / "busybox-build.tar.gz"
            try:
                await build_busybox_image(upload)
                row = await self.images.import_file(upload)
                await self.images.set_alias("busybox", row.fingerprint, "Built-in busybox image")
            except Exception as err:
                log.warning("could not build the built-in busybox image: %s", err)
            finally:
                upload.unlink(missing_ok=True)  # imported (moved away) or failed: never left behind
        result = await process.run(["lxc-start", "--version"], check=False)
        self.lxc_version = result.stdout.decode().strip()

    def listen_addresses(self) -> list[str]:
        return [self._https_address] if self._https_site is not None else []

    async def set_server_config(self, changes: dict[str, str], *, replace: bool) -> None:
        current = await self.store.server_config()
        new = dict(changes) if replace else {**current, **changes}
        new = {k: v for k, v in new.items() if v != ""}
        validate_server_config(new)
        address = new.get("core.https_address", "")
        if address != self._https_address:
            await self._listen_https(address)
        await self.store.replace_server_config(new)

    async def _listen_https(self, address: str) -> None:
        assert self._runner is not None
        if self._https_site is not None:
            await self._https_site.stop()
            self._https_site = None
            self._https_address = ""
        if not address:
            return
        host, _, port = address.rpartition(":")
        context = tls.server_context(self.paths.server_cert, self.paths.server_key)
        site = web.TCPSite(self._runner, host.strip("[]"), int(port), ssl_context=context, reuse_address=True)
        try:
            await site.start()
        except OSError as err:
            raise BadRequest(f"Cannot listen on {address}: {err.strerror}") from None
        self._https_site = site
        self._https_address = address

    async def redefine_instances(self, profile: str) -> None:
        for row in await self.store.instances():
            if profile in row.profiles:
                await self.instances.driver(row.type).define(await self.instances.spec(row))

    async def serve(self, https_address: str | None) -> None:
        """Clean up what a crash left and bring the networks up before answering anyone (a client must never
        see a half-created instance, or start one before its bridge exists); start instances after."""
        self._reaper.start()
        probing = asyncio.ensure_future(self._probe_accelerator())  # beside the rest; VM starts wait for it
        self.lxc.use_criu(await criu.probe(self.paths.root))
        if self.lxc.criu.refusal:
            log.warning("live container migration is off: %s", self.lxc.criu.refusal)
        elif self.lxc.criu.dirty_tracking_refusal:
            log.info("live container migration: CRIU %s; %s", self.lxc.criu.version,
                     self.lxc.criu.dirty_tracking_refusal)
        await self.storage.activate_all()
        await self.lxc.seal()
        if self.qemu is not None:
            await self.qemu.prepare()
        left = await self.migration.remove_leftovers()
        await self.instances.remove_incomplete()
        await self.backups.start()
        await self.volumes.remove_incomplete()
        await self.networks.start_all()
        await self.migration.recover(left)
        app = build_app(self)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        sock = self.paths.unix_socket
        sock.unlink(missing_ok=True)
        unix_site = web.UnixSite(self._runner, str(sock))
        previous = os.umask(0o117)  # never connectable by others, not even for a moment (connecting needs write)
        try:
            await unix_site.start()
        finally:
            os.umask(previous)
        os.chmod(sock, 0o660)  # root and its group; only uid 0 is trusted on it (auth.identify)
        config = await self.store.server_config()
        if https_address is not None:
            config["core.https_address"] = https_address
            validate_server_config(config)
            await self.store.replace_server_config(config)
        if config.get("core.https_address"):
            await self._listen_https(config["core.https_address"])
        await probing
        await self.instances.restore_power_state()
        log.info("stapesd ready: unix socket %s, https %s", sock, self._https_address or "off")

    async def _probe_accelerator(self) -> None:
        """Once per start: KVM only where a probe boot proves it works, else TCG (accel.py)."""
        if self.qemu is None:
            log.warning("virtual machines are off: %s", self.qemu_host.refusal)
            return
        try:
            self.vm_accelerator = await accel.probe(self.qemu_host, self.paths.root)
        except Exception as err:  # never fatal: containers run on
            self.vm_accelerator = accel.Accelerator("", f"the accelerator probe failed: {err}")
        self.qemu.use_accelerator(self.vm_accelerator)
        if self.vm_accelerator.name:
            log.info("virtual machines: QEMU %s, %s (%s)", self.vm_accelerator.qemu_version,
                     self.vm_accelerator.name, self.vm_accelerator.reason)
        else:
            log.warning("virtual machines cannot start: %s", self.vm_accelerator.reason)

    async def shutdown(self) -> None:
        await self.instances.stop_watching()
        if self.qemu is not None:
            await self.qemu.shutdown()  # QMP connections only: the VMs run on
        await self.operations.shutdown()
        await self.backups.shutdown()
        await self.networks.shutdown()
        if self._runner is not None:
            await self._runner.cleanup()
        await self._reaper.stop()
        await self.store.close()
        self.paths.unix_socket.unlink(missing_ok=True)


def make_private_directories(paths: StatePaths) -> None:
    """Every directory of the layout with its mode, set again at each start (an older server made some of
    them readable by all), and the database's files root's alone."""
    for directory, mode in paths.private_directories().items():
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, mode)
    for name in ("stapes.db", "stapes.db-wal", "stapes.db-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(paths.database.parent / name, 0o600)
    with contextlib.suppress(FileNotFoundError):
        os.chmod(paths.server_key, 0o600)


async def run(state_dir: Path, https_address: str | None,
              log_file: logfile.PrivateRotatingFileHandler | None = None) -> None:
    paths = StatePaths(state_dir.resolve())
    await asyncio.to_thread(make_private_directories, paths)
    await asyncio.to_thread(ensure_certificate, paths.server_cert, paths.server_key, server=True)
    store = await Store.open(paths.database)
    daemon = Daemon(paths, store)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if log_file is not None:  # logrotate moved the file away: write to a new one at the path
        loop.add_signal_handler(signal.SIGHUP, log_file.reopen)
    try:
        await daemon.initialise()
        await daemon.serve(https_address)
        await stop.wait()
        log.info("stapesd stopping (its instances keep running; they are not stopped with the server)")
    finally:
        with contextlib.suppress(Exception):
            await daemon.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="stapesd", description="The Stapes instance server.")
    parser.add_argument("--state-dir", default=os.environ.get("STAPES_DIR", "/var/lib/stapes"),
                        help="state directory (default: $STAPES_DIR or /var/lib/stapes)")
    parser.add_argument("--https-address", default=None,
                        help="listen for HTTPS on HOST:PORT (stored as core.https_address)")
    parser.add_argument("--verbose", "-v", action="store_true", help="log at debug level")
    parser.add_argument("--version", action="version", version=f"stapesd {__version__}")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("stapesd: must run as root (it runs containers)")
    # stderr (journald under systemd) and <state>/logs/stapesd.log, 0600, rotated; reopened on SIGHUP
    log_file = logfile.setup(Path(args.state_dir), verbose=args.verbose)
    try:
        asyncio.run(run(Path(args.state_dir), args.https_address, log_file))
    except BadRequest as err:
        sys.exit(f"stapesd: {err.message}")


if __name__ == "__main__":
    main()
