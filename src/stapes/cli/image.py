"""`stapes image`: the server's image store."""

from __future__ import annotations

from pathlib import Path

import click

from stapes.api.errors import BadRequest
from stapes.cli import render
from stapes.cli.common import client_for, parse, parse_remote_only


def register(cli: click.Group) -> None:
    @cli.group()
    def image() -> None:
        """Manage images."""

    @image.command(name="list")
    @click.argument("remote", required=False)
    @click.option("-f", "--format", "fmt", type=click.Choice(render.FORMATS), default="table")
    def list_images(remote: str | None, fmt: str) -> None:
        """List images.

        \b
        Example:
          stapes image list s1:
        """
        with client_for(parse_remote_only(remote)) as client:
            images = client.images()
        rows = [[", ".join(a["name"] for a in i["aliases"]), i["fingerprint"][:12],
                 i["properties"].get("description", ""), i["architecture"], i["type"].upper(),
                 f"{i['size'] / 2**20:.2f}MiB"] for i in images]
        render.table(["ALIAS", "FINGERPRINT", "DESCRIPTION", "ARCHITECTURE", "TYPE", "SIZE"], rows, fmt,
                     raw=images)

    @image.command(name="import")
    @click.argument("tarball", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @click.argument("remote", required=False)
    @click.option("--alias", "aliases", multiple=True, help="Alias for the new image (repeatable)")
    @click.option("-q", "--quiet", is_flag=True)
    def import_image(tarball: Path, remote: str | None, aliases: tuple[str, ...], quiet: bool) -> None:
        """Import a unified image tarball: metadata.yaml + rootfs/ (a container) or + rootfs.img, a qcow2 disk (a
        virtual machine).

        \b
        Example:
          stapes image import alpine.tar.gz s1: --alias alpine
        """
        with client_for(parse_remote_only(remote)) as client, render.progress("Importing image", quiet) as update:
            op = client.import_image(tarball, list(aliases), update)
        render.success(f"Image imported with fingerprint: {op['metadata']['fingerprint']}", quiet)

    @image.command(name="build")
    @click.argument("name", type=click.Choice(["busybox", "busybox-vm", "debian/12", "debian/13"]))
    @click.argument("remote", required=False)
    @click.option("--vm", is_flag=True, help="A virtual-machine image (busybox --vm is busybox-vm)")
    @click.option("--alias", "aliases", multiple=True,
                  help="Alias for the new image (repeatable; a Debian image is called debian/N, a Debian VM "
                       "image debian/N/vm, the tiny VM busybox-vm, unless given)")
    @click.option("-q", "--quiet", is_flag=True)
    def build(name: str, remote: str | None, vm: bool, aliases: tuple[str, ...], quiet: bool) -> None:
        """Build an image on the server: busybox (from the host's busybox, no network needed), a minimal
        Debian system from the Debian archive (mmdebstrap; cached on the server for a week), or with --vm their
        virtual-machine images: busybox-vm (a Debian kernel, busybox and the guest agent; boots in seconds and
        prints a heartbeat on its console) and a Debian VM (systemd, the guest agent, UEFI).

        \b
        Examples:
          stapes image build busybox s1: --alias bb
          stapes image build debian/12 s1: && stapes launch s1:debian/12 d1
          stapes image build busybox --vm s1: && stapes launch s1:busybox-vm v1 --vm
          stapes image build debian/12 --vm s1: && stapes launch s1:debian/12/vm v2 --vm
        """
        builtin = name
        if vm or name == "busybox-vm":
            builtin = "busybox-vm" if name.startswith("busybox") else f"{name}/vm"
        with client_for(parse_remote_only(remote)) as client, render.progress(f"Building {builtin}", quiet) as update:
            op = client.build_image(builtin, list(aliases), update)
        render.success(f"Image built with fingerprint: {op['metadata']['fingerprint']}", quiet)

    @image.command(name="delete")
    @click.argument("names", nargs=-1, required=True)
    def delete(names: tuple[str, ...]) -> None:
        """Delete images (by alias or fingerprint).

        \b
        Examples:
          stapes image delete s1:debian/12
          stapes image delete 3f5a9c
        """
        for spec in names:
            remote, name = parse(spec)
            with client_for(remote) as client:
                client.delete_image(name)

    @image.command(name="show")
    @click.argument("name")
    def show(name: str) -> None:
        """Show an image as YAML.

        \b
        Examples:
          stapes image show s1:busybox
        """
        remote, image_name = parse(name)
        with client_for(remote) as client:
            render.show_yaml(client.image(image_name))

    @image.group(name="alias")
    def alias() -> None:
        """Image aliases."""

    @alias.command(name="create")
    @click.argument("name")
    @click.argument("target")
    @click.option("--description", default="")
    def alias_create(name: str, target: str, description: str) -> None:
        """Create an alias for an image fingerprint.

        \b
        Example:
          stapes image alias create s1:bb 23d0527f
        """
        remote, alias_name = parse(name)
        with client_for(remote) as client:
            client.create_alias(alias_name, target, description)

    @alias.command(name="delete")
    @click.argument("name")
    def alias_delete(name: str) -> None:
        """Delete an alias.

        \b
        Examples:
          stapes image alias delete s1:old-busybox
        """
        remote, alias_name = parse(name)
        with client_for(remote) as client:
            client.delete_alias(alias_name)

    @alias.command(name="list")
    @click.argument("remote", required=False)
    @click.option("-f", "--format", "fmt", type=click.Choice(render.FORMATS), default="table")
    def alias_list(remote: str | None, fmt: str) -> None:
        """List aliases.

        \b
        Examples:
          stapes image alias list s1:
        """
        with client_for(parse_remote_only(remote)) as client:
            aliases = client.aliases()
        render.table(["ALIAS", "FINGERPRINT", "DESCRIPTION"],
                     [[a["name"], a["target"][:12], a["description"]] for a in aliases], fmt, raw=aliases)
        if remote and not remote.endswith(":") and ":" in remote:
            raise BadRequest("Give a remote as 'NAME:'")
