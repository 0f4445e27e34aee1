"""`stapes config device ...` and `stapes profile device ...`: one command set for an instance's or a profile's
devices, as Incus's `config device` / `profile device`. Changes go through a PUT of the whole object, so the
server's device validation decides (unknown types or keys are refused with its message)."""

from __future__ import annotations

from typing import Any

import click

from stapes.api.errors import BadRequest, NotFound
from stapes.cli import render
from stapes.cli.common import client_for, key_values, parse
from stapes.client.client import Client

_EDITABLE = {"instance": ("config", "devices", "profiles", "description"),
             "profile": ("config", "devices", "description")}


def split_settings(args: tuple[str, ...]) -> dict[str, str]:
    """Incus's forms: 'KEY=VALUE...' or 'KEY VALUE' (pure)."""
    if len(args) == 2 and "=" not in args[0]:
        return {args[0]: args[1]}
    return key_values(args, "device setting")


class _Owner:
    """An instance or a profile, read once, written back whole."""

    def __init__(self, client: Client, kind: str, name: str) -> None:
        self.client, self.kind, self.name = client, kind, name
        self.body: dict[str, Any] = client.instance(name) if kind == "instance" else client.entity("profile", name)
        self.devices: dict[str, dict[str, str]] = {k: dict(v) for k, v in (self.body.get("devices") or {}).items()}

    def noun(self) -> str:
        return f"{self.kind} {self.name!r}"

    def local(self, device: str) -> dict[str, str]:
        found = self.devices.get(device)
        if found is not None:
            return found
        if self.kind == "instance" and device in (self.body.get("expanded_devices") or {}):
            raise BadRequest(f"Device {device!r} of {self.name!r} comes from a profile: change it there, or copy "
                             f"it to the instance with 'stapes config device override {self.name} {device} ...'")
        raise NotFound(f"Device {device!r} does not exist on {self.noun()}")

    def save(self) -> None:
        body = {k: self.body.get(k) for k in _EDITABLE[self.kind]}
        body["devices"] = self.devices
        if self.kind == "instance":
            self.client.update_instance(self.name, body, patch=False)
        else:
            self.client.update_entity("profile", self.name, body, patch=False)

    def done(self, message: str) -> None:
        """What was done, and (an instance that runs) when it takes effect: the server applies device changes
        when the instance starts, not to a running one."""
        if self.kind == "instance" and self.body.get("status") not in (None, "Stopped"):
            message += f" ({self.name} is running: the change takes effect at its next start)"
        render.success(message)


def register_device_commands(group: click.Group, kind: str, word: str) -> None:
    """`word` names the owner in the help: 'INSTANCE' or 'PROFILE'; `kind` is 'instance' or 'profile'."""
    prefix = "config device" if kind == "instance" else "profile device"
    sample = "c1" if kind == "instance" else "default"

    def owner(target: str) -> Any:
        remote, name = parse(target)
        return client_for(remote), name

    @group.command(name="add", help=f"""Add a device to {'an instance' if kind == 'instance' else 'a profile'}.

        \b
        Examples:
          stapes {prefix} add {sample} data disk source=/srv/data path=/data
          stapes {prefix} add s1:{sample} eth1 nic network=stapesbr0 name=eth1
        """)
    @click.argument("target", metavar=f"[REMOTE:]{word}")
    @click.argument("device")
    @click.argument("device_type", metavar="TYPE")
    @click.argument("settings", nargs=-1, metavar="[KEY=VALUE]...")
    def add(target: str, device: str, device_type: str, settings: tuple[str, ...]) -> None:
        cm, name = owner(target)
        with cm as client:
            own = _Owner(client, kind, name)
            if device in own.devices:
                raise BadRequest(f"Device {device!r} already exists on {own.noun()}")
            own.devices[device] = {"type": device_type, **key_values(settings, "device setting")}
            own.save()
            own.done(f"Device {device} added to {name}")

    @group.command(name="remove", help=f"""Remove devices.

        \b
        Example:
          stapes {prefix} remove {sample} data
        """)
    @click.argument("target", metavar=f"[REMOTE:]{word}")
    @click.argument("names", nargs=-1, required=True, metavar="DEVICE...")
    def remove(target: str, names: tuple[str, ...]) -> None:
        cm, name = owner(target)
        with cm as client:
            own = _Owner(client, kind, name)
            for device in names:
                own.local(device)
                del own.devices[device]
            own.save()
            own.done(f"Device{'s' if len(names) > 1 else ''} {', '.join(names)} removed from {name}")

    @group.command(name="list", help=f"""List the devices (their names).

        \b
        Example:
          stapes {prefix} list {sample}
        """)
    @click.argument("target", metavar=f"[REMOTE:]{word}")
    def list_cmd(target: str) -> None:
        cm, name = owner(target)
        with cm as client:
            own = _Owner(client, kind, name)
        for device in sorted(own.devices):
            click.echo(device)

    whose = "the instance's own devices (not its profiles')" if kind == "instance" else "the profile's devices"

    @group.command(name="show", help=f"""Show {whose} as YAML.

        \b
        Example:
          stapes {prefix} show {sample}
        """)
    @click.argument("target", metavar=f"[REMOTE:]{word}")
    def show(target: str) -> None:
        cm, name = owner(target)
        with cm as client:
            own = _Owner(client, kind, name)
        render.show_yaml(own.devices)

    @group.command(name="get", help=f"""Print one key of a device.

        \b
        Example:
          stapes {prefix} get {sample} data source
        """)
    @click.argument("target", metavar=f"[REMOTE:]{word}")
    @click.argument("device")
    @click.argument("key")
    def get(target: str, device: str, key: str) -> None:
        cm, name = owner(target)
        with cm as client:
            own = _Owner(client, kind, name)
            found = own.devices.get(device)
            if found is None and kind == "instance":
                found = (own.body.get("expanded_devices") or {}).get(device)
            if found is None:
                raise NotFound(f"Device {device!r} does not exist on {own.noun()}")
        click.echo(found.get(key, ""))

    @group.command(name="set", help=f"""Set keys of a device (KEY=VALUE... or KEY VALUE).

        \b
        Examples:
          stapes {prefix} set {sample} data readonly=true
          stapes {prefix} set {sample} data source /srv/other
        """)
    @click.argument("target", metavar=f"[REMOTE:]{word}")
    @click.argument("device")
    @click.argument("settings", nargs=-1, required=True, metavar="KEY=VALUE...")
    def set_cmd(target: str, device: str, settings: tuple[str, ...]) -> None:
        cm, name = owner(target)
        with cm as client:
            own = _Owner(client, kind, name)
            values = split_settings(settings)
            if "type" in values:
                raise BadRequest("A device's type cannot change: remove the device and add it again")
            own.local(device).update(values)
            own.save()
            own.done(f"Device {device} of {name} updated")

    @group.command(name="unset", help=f"""Remove a key from a device.

        \b
        Example:
          stapes {prefix} unset {sample} data readonly
        """)
    @click.argument("target", metavar=f"[REMOTE:]{word}")
    @click.argument("device")
    @click.argument("key")
    def unset(target: str, device: str, key: str) -> None:
        cm, name = owner(target)
        with cm as client:
            own = _Owner(client, kind, name)
            current = own.local(device)
            if key == "type":
                raise BadRequest("A device's type cannot be removed: remove the device instead")
            if key not in current:
                raise BadRequest(f"Key {key!r} is not set on device {device!r}")
            del current[key]
            own.save()
            own.done(f"Device {device} of {name} updated")

    if kind != "instance":
        return

    @group.command(name="override", help="""Copy a device from the instance's profiles to the instance, with changes.

        \b
        Examples:
          stapes config device override c1 root size=2GiB
          stapes config device override c1 eth0 hwaddr=00:16:3e:00:00:01
        """)
    @click.argument("target", metavar="[REMOTE:]INSTANCE")
    @click.argument("device")
    @click.argument("settings", nargs=-1, metavar="[KEY=VALUE]...")
    def override(target: str, device: str, settings: tuple[str, ...]) -> None:
        cm, name = owner(target)
        with cm as client:
            own = _Owner(client, kind, name)
            if device in own.devices:
                raise BadRequest(f"Device {device!r} is already the instance's own: change it with "
                                 f"'stapes config device set {name} {device} KEY=VALUE'")
            inherited = (own.body.get("expanded_devices") or {}).get(device)
            if inherited is None:
                raise NotFound(f"Device {device!r} is in none of the profiles of {name!r}")
            own.devices[device] = {**inherited, **key_values(settings, "device setting")}
            own.save()
            own.done(f"Device {device} overridden for {name}")
