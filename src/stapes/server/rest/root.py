"""GET/PUT/PATCH /1.0: server information and server configuration."""

from __future__ import annotations

import os
import platform
import socket

from aiohttp import web

from stapes import __version__
from stapes.api.requests import ServerPut
from stapes.server.rest.common import body, caller, daemon, sync
from stapes.server.storage.service import DRIVERS as STORAGE_DRIVERS

# Incus API extensions whose behaviour Stapes implements (names as Incus spells them).
API_EXTENSIONS = [
    "storage", "projects", "instances", "certificate_token", "explicit_trust_token", "certificate_update",
    "exec_environment", "container_exec_signal_handling", "operation_wait", "image_aliases_list",
    "api_filtering", "container_full", "container_backup", "instance_all_projects", "resources",
    "server_info_pid", "instance_create_start", "network", "network_state", "network_leases",
    "container_push", "container_push_target", "container_only_migration", "migration_progress",
    "storage_api_volume_rename", "storage_api_local_volume_handling", "storage_api_remote_volume_handling",
    "custom_block_volumes", "storage_volumes_created_at",
    "container_backup_override_pool", "backup_compression_algorithm", "backup_override_name",
    "console", "virtual-machines",
]


def routes(r: web.RouteTableDef) -> None:
    @r.get("/")
    async def api_root(request: web.Request) -> web.Response:
        return sync(["/1.0"])

    @r.get("/1.0")
    async def server_info(request: web.Request) -> web.Response:
        d = daemon(request)
        who = caller(request)
        info: dict[str, object] = {
            "api_extensions": API_EXTENSIONS, "api_status": "stable", "api_version": "1.0",
            "auth": "trusted" if who.trusted else "untrusted", "public": False, "auth_methods": ["tls"],
        }
        if who.trusted:
            uname = platform.uname()
            info.update({
                "auth_user_name": "root" if who.via_unix else who.name,
                "auth_user_method": "unix" if who.via_unix else "tls",
                "config": await d.store.server_config(),
                "environment": {
                    "addresses": d.listen_addresses(), "architectures": [uname.machine],
                    "certificate": d.certificate_pem, "certificate_fingerprint": d.certificate_fingerprint,
                    "driver": "lxc", "driver_version": d.lxc_version, "firewall": "nftables",
                    "kernel": uname.system, "kernel_architecture": uname.machine, "kernel_version": uname.release,
                    "os_name": "Debian", "os_version": "", "project": "default", "server": "stapes",
                    "server_clustered": False, "server_event_mode": "full-mesh", "server_name": socket.gethostname(),
                    "server_pid": os.getpid(), "server_version": __version__, "storage": "dir",
                    "storage_version": "1", "storage_supported_drivers": [
                        {"name": name, "version": "1", "remote": False} for name in sorted(STORAGE_DRIVERS)],
                    "instance_types": ["container"] + (
                        ["virtual-machine"] if d.qemu is not None and d.vm_accelerator.name else []),
                    # Ours: which accelerator VMs run with here, and why (KVM only where a probe boot works).
                    "vm_accelerator": d.vm_accelerator.to_json(),
                    "unprivileged": await d.instances.unprivileged_status(),
                    "live_migration": {"container": d.lxc.criu.to_json()},
                },
            })
        return sync(info)

    @r.put("/1.0")
    async def replace_server_config(request: web.Request) -> web.Response:
        data = await body(request, ServerPut)
        await daemon(request).set_server_config(data.config or {}, replace=True)
        return sync()

    @r.patch("/1.0")
    async def update_server_config(request: web.Request) -> web.Response:
        data = await body(request, ServerPut)
        await daemon(request).set_server_config(data.config or {}, replace=False)
        return sync()
