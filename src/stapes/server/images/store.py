"""Local image store, by SHA-256 fingerprint, in Incus's formats.

Containers: a unified tarball (metadata.yaml + rootfs/), kept as it came. Virtual machines: metadata.yaml (and
templates/) with a qcow2 disk, `rootfs.img`, either unified in one tarball or split (a metadata tarball and the
qcow2 file; the fingerprint is then the SHA-256 of both, in that order, as Incus's). A VM image is kept split:
`<fingerprint>` the metadata tarball, `<fingerprint>.rootfs` the qcow2, checked on import: a qcow2 only (never a
probed format), no backing file, no external data file, no encryption, a bounded virtual size.

A VM image's tarball is read by Python's tarfile, never extracted by tar: only `metadata.yaml`, the regular
files and directories of `templates/` and (unified) `rootfs.img` are taken, each bounded as it is read (a
tarball may be compressed, or hold sparse members, and so unpack to far more than was uploaded): the disk to
UNPACK_FACTOR times the upload, MAX_DISK_SIZE and the free space; each template to MAX_TEMPLATE_BYTES and all of
them to MAX_CONFIG_BYTES. Sparse members are refused (a qcow2 keeps its own holes). The metadata tarball kept in
the store is always rebuilt from what was taken, so unpacking it later holds no surprise either. qemu-img runs on
an image under resource limits (as OpenStack's, OSSA-2016-012): `info` in an address space of 1 GiB and 30 s
of CPU, `convert` in CPU time in proportion to the disk's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import stat
import subprocess
import tarfile
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO, Any

from stapes.api.documents import check_record_size, load_yaml
from stapes.api.errors import BadRequest, Conflict, NotFound
from stapes.api.names import validate_alias_name
from stapes.server import process
from stapes.server.store.db import ImageRow, Store

ARCHITECTURE = {"x86_64": "x86_64", "aarch64": "aarch64"}.get(platform.machine(), platform.machine())
MAX_METADATA_BYTES = 256 << 10  # an image's metadata.yaml: Incus's are a few KiB
MAX_PROPERTIES = 256
MAX_PROPERTY_CHARS = 4096
MAX_RECORD_BYTES = 64 << 10  # the image's row, as stored and served
MAX_DISK_SIZE = 1 << 40  # a VM image's virtual disk size
CONTAINER, VIRTUAL_MACHINE = "container", "virtual-machine"
ROOTFS_IMAGE = "rootfs.img"
QEMU_IMG_TIMEOUT = 120.0
FREE_SPACE_MARGIN = 256 << 20  # as for uploads: unpacking an image never fills the server's disk
UNPACK_FACTOR = 8  # a unified VM tarball's disk may unpack to this many times the upload (a compressed tarball),
UNPACK_FLOOR = 64 << 20  # or to this (a nearly empty qcow2 compresses a hundredfold)
MAX_TEMPLATE_BYTES = 1 << 20  # one file of an image's templates/: Incus's are a few hundred bytes
MAX_CONFIG_BYTES = 16 << 20  # metadata.yaml and all of templates/ together
MAX_CONFIG_MEMBERS = 1024  # entries in templates/
MAX_VM_MEMBERS = 4096  # entries of a VM image's tarball (Incus's hold a handful)
MAX_HEADER_BYTES = 64 << 10  # one pax or GNU long-name header of a VM image's tarball
INFO_ADDRESS_SPACE = 1 << 30  # qemu-img info, as OpenStack runs it (prlimit --as=1G --cpu=30)
INFO_CPU_SECONDS = 30
CONVERT_CPU_SECONDS = 120  # qemu-img convert: this much CPU time ...
CONVERT_CPU_PER_GIB = 30  # ... plus this per GiB of the qcow2 file (zlib clusters: ~3 s/GiB measured)
CONFIG_DIR = "templates"


def image_fields(metadata: dict[str, Any]) -> tuple[dict[str, str], str, float | None]:
    """The properties, architecture and creation date an image's metadata.yaml gives its record, checked and
    bounded (pure: unit-tested)."""
    properties = metadata.get("properties") or {}
    if not isinstance(properties, dict) or len(properties) > MAX_PROPERTIES:
        raise BadRequest(f"The image's metadata.yaml 'properties' must be a mapping of at most {MAX_PROPERTIES} "
                         "entries")
    props: dict[str, str] = {}
    for key, value in properties.items():
        name, text = str(key), str(value)
        if isinstance(value, dict | list):
            raise BadRequest(f"The image's property {name[:64]!r} must be a plain value, not a list or mapping")
        if not 0 < len(name) <= 255 or len(text) > MAX_PROPERTY_CHARS:
            raise BadRequest(f"The image's property {name[:64]!r}: names of 1 to 255 and values of at most "
                             f"{MAX_PROPERTY_CHARS} characters")
        props[name] = text
    architecture = metadata.get("architecture", ARCHITECTURE)
    if not isinstance(architecture, str) or not 0 < len(architecture) <= 64:
        raise BadRequest("The image's metadata.yaml 'architecture' must be a name such as x86_64")
    created = metadata.get("creation_date")
    if created is not None and (isinstance(created, bool) or not isinstance(created, int | float)
                                or not 0 <= created < 2**40):
        raise BadRequest("The image's metadata.yaml 'creation_date' must be a Unix time in seconds")
    check_record_size({"properties": props, "architecture": architecture}, "The image's metadata",
                      MAX_RECORD_BYTES)
    return props, architecture, None if created is None else float(created)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


async def _layout(tarball: Path) -> tuple[str | None, bool, str | None]:
    """The name metadata.yaml has in the tarball (with or without './'), whether it holds rootfs/, and the name
    of its rootfs.img (a VM image's disk) if it has one. The listing is read line by line and never kept (an
    image of millions of entries costs no memory), to its end: a tarball that does not read to the end is
    refused now, not at its first launch."""
    proc = await process.spawn(["tar", "-tf", str(tarball)], stdin=asyncio.subprocess.DEVNULL,
                               stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    member, rootfs, disk, tail = None, False, None, bytearray()

    async def drain_stderr() -> None:
        assert proc.stderr is not None
        while chunk := await proc.stderr.read(65536):
            tail.extend(chunk)
            del tail[:-4096]

    draining = asyncio.create_task(drain_stderr())
    try:
        async with process.reaped(proc):
            assert proc.stdout is not None
            try:
                while line := await proc.stdout.readline():
                    name = line.decode(errors="replace").rstrip("\n")
                    if name.removeprefix("./") == "metadata.yaml" and member is None:
                        member = name
                    rootfs = rootfs or name.removeprefix("./").split("/")[0] == "rootfs"
                    if name.removeprefix("./") == ROOTFS_IMAGE and disk is None:
                        disk = name
            except ValueError:  # a line longer than the stream's limit (64 KiB): no name is
                raise BadRequest("The image is not a readable tarball: it lists a name longer than 64 KiB") from None
            if await proc.wait() != 0:
                await asyncio.wait_for(draining, 5)
                reason = tail.decode(errors="replace").strip().splitlines()
                raise BadRequest(f"The image is not a readable tarball: {reason[-1] if reason else 'tar failed'}")
    finally:
        draining.cancel()
    return member, rootfs, disk


async def _read_member(tarball: Path, member: str, limit: int) -> bytes:
    """One member of a tarball, read no further than `limit` bytes (one more says it is too large)."""
    proc = await process.spawn(["tar", "-xOf", str(tarball), member], stdin=asyncio.subprocess.DEVNULL,
                               stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    async with process.reaped(proc):
        assert proc.stdout is not None
        data = bytearray()
        while len(data) <= limit and (chunk := await proc.stdout.read(65536)):
            data += chunk
        if len(data) > limit:
            raise BadRequest(f"The image's {member} is larger than the {limit} bytes accepted")
        if await proc.wait() != 0:
            raise BadRequest(f"The image's {member} could not be read from the tarball")
    return bytes(data)


def check_disk_info(info: dict[str, Any]) -> int:
    """What `qemu-img info --output=json -f qcow2` says of a VM image's disk, checked (pure: unit-tested):
    its virtual size; BadRequest for anything that would make QEMU read beyond the file itself."""
    if info.get("format") != "qcow2":
        raise BadRequest(f"The image's {ROOTFS_IMAGE} is not a qcow2 disk")
    if any(key in info for key in ("backing-filename", "full-backing-filename", "backing-filename-format")):
        raise BadRequest(f"The image's {ROOTFS_IMAGE} names a backing file ({info.get('backing-filename')!r}): "
                         "refused, an image holds its whole disk")
    data = (info.get("format-specific") or {}).get("data") or {}
    if data.get("data-file") or data.get("data-file-raw"):
        raise BadRequest(f"The image's {ROOTFS_IMAGE} keeps its data in an external file "
                         f"({data.get('data-file')!r}): refused")
    if info.get("encrypted") or data.get("encrypt"):
        raise BadRequest(f"The image's {ROOTFS_IMAGE} is encrypted: refused")
    if data.get("corrupt"):
        raise BadRequest(f"The image's {ROOTFS_IMAGE} is marked corrupt")
    size = info.get("virtual-size")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_DISK_SIZE:
        raise BadRequest(f"The image's {ROOTFS_IMAGE} has a virtual size of {size!r} bytes: at most "
                         f"{MAX_DISK_SIZE} are accepted")
    return size


def limited(argv: list[str], *, address_space: int | None = None, cpu_seconds: int) -> list[str]:
    """`argv` run under resource limits (prlimit, util-linux), for a tool reading an untrusted file."""
    limits = [f"--cpu={cpu_seconds}"] + ([] if address_space is None else [f"--as={address_space}"])
    return ["prlimit", *limits, "--", *argv]


def _need_qemu_img() -> None:
    if shutil.which("qemu-img") is None:
        raise BadRequest("qemu-img is not installed on the server (scripts/setup-vm.sh installs qemu-utils)")


async def disk_info(path: Path) -> int:
    """The qcow2 at `path`, read by qemu-img as qcow2 only (no format is probed), within an address space of
    INFO_ADDRESS_SPACE and INFO_CPU_SECONDS of CPU, checked: its virtual size."""
    _need_qemu_img()
    argv = limited(["qemu-img", "info", "--output=json", "-f", "qcow2", str(path)],
                   address_space=INFO_ADDRESS_SPACE, cpu_seconds=INFO_CPU_SECONDS)
    try:
        result = await process.run(argv, check=False, timeout=QEMU_IMG_TIMEOUT)
    except FileNotFoundError:
        raise BadRequest("prlimit is not installed on the server (Debian's util-linux has it)") from None
    if result.returncode != 0:
        reason = result.error_text or (f"qemu-img was stopped by signal {-result.returncode}, past its limits "
                                       f"({INFO_ADDRESS_SPACE >> 20} MiB of memory, {INFO_CPU_SECONDS} s of CPU)")
        raise BadRequest(f"The image's {ROOTFS_IMAGE} is not a readable qcow2 disk: {reason}")
    try:
        info = json.loads(result.stdout)
    except ValueError:
        raise BadRequest(f"qemu-img could not describe the image's {ROOTFS_IMAGE}") from None
    if not isinstance(info, dict):
        raise BadRequest(f"qemu-img could not describe the image's {ROOTFS_IMAGE}")
    return check_disk_info(info)


def convert_cpu_seconds(qcow2_bytes: int) -> int:
    """The CPU time `qemu-img convert` may take for a qcow2 file of this size (pure: unit-tested)."""
    return CONVERT_CPU_SECONDS + CONVERT_CPU_PER_GIB * -(-qcow2_bytes // (1 << 30))


class _Refused(BadRequest):
    """A VM image's tarball member that is not taken (raised inside tarfile's header parsing too)."""


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile's header parsing, with what would make it allocate without bound refused first: pax and GNU
    long-name headers larger than MAX_HEADER_BYTES (tarfile reads them whole into memory) and sparse members
    (whose maps it gathers whole; a qcow2 keeps its own holes)."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                         tarfile.SOLARIS_XHDTYPE) and self.size > MAX_HEADER_BYTES:
            raise _Refused(f"The image's tarball has a header of {self.size} bytes (at most {MAX_HEADER_BYTES} "
                           "are accepted): refused")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise self._sparse()
        member: tarfile.TarInfo = super()._proc_member(tarfile_)  # type: ignore[misc]
        return member

    def _sparse(self) -> _Refused:
        return _Refused(f"The image's {self.name[:200]!r} is a sparse tar member: refused (make the tarball "
                        "without --sparse; a qcow2 disk keeps its own holes)")

    def _proc_gnusparse_00(self, *args: Any) -> None:
        raise self._sparse()

    def _proc_gnusparse_01(self, *args: Any) -> None:
        raise self._sparse()

    def _proc_gnusparse_10(self, *args: Any) -> None:
        raise self._sparse()


_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"(\xb5/\xfd": "zstd",
          b"LZIP": "lzip", b"\x89LZO": "lzop", b"\x04\x22\x4d\x18": "lz4"}


@contextlib.contextmanager
def _open_tar(path: Path) -> Iterator[tarfile.TarFile]:
    """A VM image's tarball for reading, plain (seekable: skipped members are not read) or compressed as
    Incus's tools compress (gzip, bzip2, xz by tarfile; zstd through the zstd tool, as tar would)."""
    with path.open("rb") as handle:
        head = handle.read(8)
    kind = next((name for magic, name in _MAGIC.items() if head.startswith(magic)), None)
    if kind in ("lzip", "lzop", "lz4"):
        raise BadRequest(f"The image's tarball is compressed with {kind}, which this server does not unpack for a "
                         "virtual machine's image: use gzip, bzip2, xz, zstd or none")
    if kind != "zstd":
        with tarfile.open(path, "r:" if kind is None else "r|*", tarinfo=_BoundedTarInfo) as tar:
            yield tar
        return
    proc = subprocess.Popen(["zstd", "-dcq", "--", str(path)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, close_fds=True)
    try:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|", tarinfo=_BoundedTarInfo) as tar:
            yield tar
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _config_name(name: str) -> str | None:
    """A member's name if it is metadata.yaml, templates/ or something below it (checked: no '..', no empty or
    '.' parts), else None (a member not taken)."""
    while name.startswith("./"):
        name = name[2:]
    parts = name.rstrip("/").split("/")
    if parts[0] not in ("metadata.yaml", CONFIG_DIR) or (parts[0] == "metadata.yaml" and len(parts) > 1):
        return None
    if any(part in ("", ".", "..") for part in parts) or len(name) > 1024:
        raise BadRequest(f"The image's tarball holds an unsafe name {name[:200]!r}: refused")
    return "/".join(parts)


def _copy(source: IO[bytes], out: IO[bytes], limit: int, what: str) -> int:
    copied = 0
    while chunk := source.read(1 << 20):
        copied += len(chunk)
        if copied > limit:
            raise BadRequest(what)
        out.write(chunk)
    return copied


def _walk_vm_tarball(path: Path, disk: Path | None = None, disk_limit: int = 0
                     ) -> Iterator[tuple[str, tarfile.TarInfo, bytes | None]]:
    """The config members of a VM image's tarball: (name, member, data) for metadata.yaml and templates/ (data
    None for a directory), in the tarball's order, each checked and bounded; other members are skipped, but all
    count against the bound of what the tarball may unpack to. With `disk`, its rootfs.img is streamed there,
    never more than `disk_limit` bytes."""
    total_limit = disk_limit + MAX_CONFIG_BYTES
    total = config = count = 0
    seen: set[str] = set()
    try:
        with _open_tar(path) as tar:
            for member in tar:
                count += 1
                total += max(member.size, 0)
                bare = member.name
                while bare.startswith("./"):
                    bare = bare[2:]
                if bare == ROOTFS_IMAGE and disk is not None and member.size > disk_limit:
                    raise BadRequest(_disk_too_large(member.size, disk_limit))
                if count > MAX_VM_MEMBERS:
                    raise BadRequest(f"The image's tarball holds more than {MAX_VM_MEMBERS} entries: refused (a "
                                     "virtual machine's image holds metadata.yaml, templates/ and rootfs.img)")
                if total > total_limit:
                    raise BadRequest(f"The image's tarball unpacks to more than {total_limit} bytes "
                                     f"({member.name[:200]!r} among them): refused (a virtual machine's image holds "
                                     f"metadata.yaml and templates/, at most {MAX_CONFIG_BYTES} bytes together, "
                                     "and rootfs.img)")
                if bare == ROOTFS_IMAGE and disk is not None:
                    if ROOTFS_IMAGE in seen or not member.isreg():
                        raise BadRequest(f"The image's {ROOTFS_IMAGE} must be one regular file: refused")
                    seen.add(ROOTFS_IMAGE)
                    source = tar.extractfile(member)
                    assert source is not None
                    with disk.open("wb") as out:
                        _copy(source, out, disk_limit, _disk_too_large(disk_limit + 1, disk_limit))
                    continue
                name = _config_name(member.name)
                if name is None:
                    continue
                if name in seen:
                    raise BadRequest(f"The image's tarball holds {name[:200]!r} twice: refused")
                seen.add(name)
                if name == CONFIG_DIR or (member.isdir() and name.startswith(f"{CONFIG_DIR}/")):
                    if not member.isdir():
                        raise BadRequest(f"The image's {CONFIG_DIR} is not a directory: refused")
                    yield name, member, None
                    continue
                if not member.isreg():
                    raise BadRequest(f"The image's {name[:200]!r} is not a regular file (a link, a device or "
                                     "another special file): refused, an image's metadata.yaml and templates/ "
                                     "hold regular files only")
                limit = MAX_METADATA_BYTES if name == "metadata.yaml" else MAX_TEMPLATE_BYTES
                if member.size > limit or len(seen) > MAX_CONFIG_MEMBERS + 2:
                    raise BadRequest(f"The image's {name[:200]!r} is {member.size} bytes (at most {limit} are "
                                     f"accepted), or templates/ holds more than {MAX_CONFIG_MEMBERS} entries: refused")
                config += member.size
                if config > MAX_CONFIG_BYTES:
                    raise BadRequest(f"The image's metadata.yaml and templates/ hold more than {MAX_CONFIG_BYTES} "
                                     "bytes: refused")
                source = tar.extractfile(member)
                assert source is not None
                data = source.read(limit + 1)
                if len(data) != member.size:
                    raise BadRequest(f"The image's {name[:200]!r} could not be read from the tarball")
                yield name, member, data
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as err:
        raise BadRequest(f"The image is not a readable tarball: {err}") from None
    if disk is not None and ROOTFS_IMAGE not in seen:
        raise BadRequest(f"The image's tarball holds no readable {ROOTFS_IMAGE}")
    if "metadata.yaml" not in seen:
        raise BadRequest("The image has no metadata.yaml")


def _disk_too_large(size: int, limit: int) -> str:
    return (f"The image's {ROOTFS_IMAGE} unpacks to {size} bytes or more, more than the {limit} accepted (at most "
            f"{UNPACK_FACTOR} times the uploaded image or {UNPACK_FLOOR >> 20} MiB, {MAX_DISK_SIZE} bytes, and what "
            f"the server's disk has free less {FREE_SPACE_MARGIN >> 20} MiB): refused")


def _rebuild_config(source: Path, target: Path, disk: Path | None = None, disk_limit: int = 0) -> bytes:
    """A VM image's metadata.yaml and templates/ (checked, bounded) as a plain tarball of their own, owned by
    root, files 0644 and directories 0755; with `disk`, its rootfs.img streamed there. Returns metadata.yaml."""
    metadata = b""
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as out:
        for name, member, data in _walk_vm_tarball(source, disk, disk_limit):
            info = tarfile.TarInfo(name)
            info.mtime = int(member.mtime) if 0 <= member.mtime < 2**33 else 0
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                out.addfile(info)
                continue
            info.size, info.mode = len(data), 0o644
            out.addfile(info, io.BytesIO(data))
            if name == "metadata.yaml":
                metadata = data
    return metadata


def _unpack_config(source: Path, target: Path) -> None:
    """A VM image's metadata.yaml and templates/ into the config directory `target`, checked and bounded; no
    link is followed (a name already there that is not a directory or regular file is refused)."""
    for name, _, data in _walk_vm_tarball(source):
        parts = name.split("/")
        where = target
        for part in parts[:-1] if data is not None else parts:
            where = where / part
            try:
                os.mkdir(where, 0o755)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(where).st_mode):
                    raise BadRequest(f"{where} is in the way of the image's {name!r}") from None
        if data is None:
            continue
        fd = os.open(where / parts[-1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as out:
            out.write(data)


def _sha256_of(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class ImageStore:
    def __init__(self, store: Store, directory: Path) -> None:
        self._store = store
        self.directory = directory
        # Built-in images made on first use: alias -> (builder writing the image's tarball, description).
        self.builtins: dict[str, tuple[Callable[[Path], Awaitable[None]], str]] = {}
        self._building = asyncio.Lock()

    def path(self, fingerprint: str) -> Path:
        return self.directory / fingerprint

    async def resolve(self, name: str) -> ImageRow:
        """An alias, a full fingerprint or a unique fingerprint prefix; a built-in image's alias is built and
        imported on first use (not at every server start: the VM image takes seconds to put together)."""
        try:
            return await self._resolve(name)
        except NotFound:
            if name not in self.builtins:
                raise
        async with self._building:
            with contextlib.suppress(NotFound):
                return await self._resolve(name)  # another request built it meanwhile
            build, description = self.builtins[name]
            upload = self.directory / f"{name}-build.tar"
            try:
                await build(upload)
                row = await self.import_file(upload, existing_ok=True)
                await self.set_alias(name, row.fingerprint, description)
            finally:
                upload.unlink(missing_ok=True)  # imported (moved away) or failed: never left behind
            return row

    async def _resolve(self, name: str) -> ImageRow:
        aliases = await self._store.aliases()
        if name in aliases:
            name = aliases[name][0]
        matches = [row for row in await self._store.images() if row.fingerprint.startswith(name)] if name else []
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise BadRequest(f"Image prefix {name!r} is ambiguous: use more characters of the fingerprint")
        raise NotFound(f"Image {name!r} not found: 'image list' shows the images and aliases this server has")

    def disk_path(self, fingerprint: str) -> Path:
        """A VM image's qcow2 disk (its metadata tarball is path(fingerprint))."""
        return self.directory / f"{fingerprint}.rootfs"

    async def import_file(self, upload: Path, properties: dict[str, str] | None = None,
                          public: bool = False, existing_ok: bool = False, rootfs: Path | None = None) -> ImageRow:
        """Takes ownership of `upload` (moved into the store or deleted), and of `rootfs` (a split VM image's
        qcow2 disk: `upload` is then its metadata tarball). `existing_ok`: the same image already in the store
        is the result (a rebuild from the cache), not a conflict."""
        parts = [upload] if rootfs is None else [upload, rootfs]
        staged: list[Path] = []
        try:
            fingerprint = await asyncio.to_thread(_sha256_of, *parts)
            for existing in await self._store.images():
                if existing.fingerprint == fingerprint:
                    if existing_ok:
                        return existing
                    raise Conflict(f"Image {fingerprint[:12]} is already in the store")
            metadata, kind, raw = await self._read_metadata(upload, split=rootfs is not None)
            props, architecture, created = image_fields(metadata)
            props.update(properties or {})
            size = sum(part.stat().st_size for part in parts)
            if kind == VIRTUAL_MACHINE:
                disk = self.directory / f".{fingerprint}.rootfs.tmp"
                meta = self.directory / f".{fingerprint}.meta.tmp"
                staged += [disk, meta]
                # Kept split, the metadata (and templates) as a tarball of its own, rebuilt from what was checked;
                # a unified tarball's disk taken out of it in the same pass.
                taken = await self._metadata_tarball(upload, meta, None if rootfs is not None else disk)
                if taken != raw:
                    raise BadRequest("The image's metadata.yaml reads differently by tar and by Python's tarfile: "
                                     "the tarball is malformed, refused")
                if rootfs is not None:
                    await asyncio.to_thread(os.replace, rootfs, disk)
                await disk_info(disk)
                await asyncio.to_thread(os.replace, meta, upload)
                await asyncio.to_thread(os.replace, disk, self.disk_path(fingerprint))
            row = ImageRow(
                fingerprint=fingerprint, filename=upload.name, size=size, type=kind,
                architecture=architecture, properties=props, public=public, created_at=created or time.time(),
            )
            await asyncio.to_thread(os.replace, upload, self.path(fingerprint))
        finally:
            for path in (*parts, *staged):
                path.unlink(missing_ok=True)
        try:
            await self._store.create_image(row)
        except BaseException:
            self.path(fingerprint).unlink(missing_ok=True)
            self.disk_path(fingerprint).unlink(missing_ok=True)
            raise
        return row

    async def _disk_limit(self, upload: Path) -> int:
        """The most a unified VM tarball's disk may unpack to: UNPACK_FACTOR times the upload, MAX_DISK_SIZE, and
        the store's free space less FREE_SPACE_MARGIN."""
        size = (await asyncio.to_thread(os.stat, upload)).st_size
        free = await asyncio.to_thread(os.statvfs, self.directory)
        return max(0, min(max(UNPACK_FACTOR * size, UNPACK_FLOOR), MAX_DISK_SIZE,
                          free.f_bavail * free.f_frsize - FREE_SPACE_MARGIN))

    async def _metadata_tarball(self, tarball: Path, target: Path, disk: Path | None = None) -> bytes:
        """The VM image's metadata.yaml and templates/ (regular files and directories only, each bounded) as a
        tarball of their own; with `disk`, the unified tarball's rootfs.img streamed there, bounded by
        `_disk_limit`. Returns the metadata.yaml taken."""
        limit = await self._disk_limit(tarball) if disk is not None else 0
        return await asyncio.to_thread(_rebuild_config, tarball, target, disk, limit)

    async def _read_metadata(self, tarball: Path, split: bool = False) -> tuple[dict[str, Any], str, bytes]:
        """The image's metadata.yaml, its type (a container's tarball holds rootfs/, a unified VM image's
        rootfs.img, a split VM image's metadata tarball neither) and metadata.yaml as read."""
        member, rootfs, disk = await _layout(tarball)
        if member is None:
            raise BadRequest("The image has no metadata.yaml: a unified image holds metadata.yaml and rootfs/ "
                             "(a container) or rootfs.img (a virtual machine)")
        if split:
            if rootfs or disk:
                raise BadRequest("A split image's metadata tarball holds metadata.yaml (and templates/), not the "
                                 "root filesystem")
            kind = VIRTUAL_MACHINE
        elif rootfs and disk:
            raise BadRequest("The image holds both rootfs/ (a container's) and rootfs.img (a virtual machine's)")
        elif disk:
            kind = VIRTUAL_MACHINE
        elif rootfs:
            kind = CONTAINER
        else:
            raise BadRequest("The image has no rootfs/ directory nor rootfs.img: a unified image holds "
                             "metadata.yaml and rootfs/ (a container) or rootfs.img (a virtual machine)")
        raw = await _read_member(tarball, member, MAX_METADATA_BYTES)
        # Bounded (no aliases, nodes, depth, size) and parsed off the event loop.
        metadata = await asyncio.to_thread(load_yaml, raw, "The image's metadata.yaml", MAX_METADATA_BYTES)
        metadata = metadata or {}
        if not isinstance(metadata, dict):
            raise BadRequest("The image's metadata.yaml must be a mapping")
        return metadata, kind, raw

    async def disk_size(self, fingerprint: str) -> int:
        """A VM image's virtual disk size: the least its root disk can be."""
        return await disk_info(self.disk_path(fingerprint))

    async def unpack(self, fingerprint: str, target: Path, disk: Path | None = None) -> None:
        """Into an instance volume, Incus's layout. A container's: the whole tarball, metadata.yaml beside
        rootfs/. A VM's: metadata.yaml and templates/ into the config directory `target`, the disk into `disk`
        (default target/root.img) raw and sparse; a `disk` that exists (the pool made it, sized, with its
        attributes) is written in place (it must be at least the image's virtual size), else it is created."""
        if not self.disk_path(fingerprint).exists():
            await process.run([
                "tar", "-xf", str(self.path(fingerprint)), "-C", str(target), "--numeric-owner",
                "--xattrs", "--xattrs-include=*", "--same-permissions",
            ])
            return
        try:
            await asyncio.to_thread(_unpack_config, self.path(fingerprint), target)
        except BadRequest as err:
            raise BadRequest(f"Image {fingerprint[:12]}'s metadata could not be unpacked: {err.message}") from None
        disk = disk or target / "root.img"
        source = self.disk_path(fingerprint)
        size = await disk_info(source)
        cpu = convert_cpu_seconds((await asyncio.to_thread(os.stat, source)).st_size)
        argv = limited(["qemu-img", "convert", "-f", "qcow2", "-O", "raw"], cpu_seconds=cpu)
        if disk.exists():
            if disk.stat().st_size < size:
                raise BadRequest(f"The root disk ({disk.stat().st_size} bytes) is smaller than image "
                                 f"{fingerprint[:12]}'s disk ({size} bytes): give it at least that size")
            argv += ["-n", "--target-is-zero"] if disk.stat().st_blocks == 0 else ["-n"]
        else:
            argv += ["-S", "4k"]
        result = await process.run([*argv, str(source), str(disk)], check=False, timeout=3600)
        if result.returncode != 0:
            reason = result.error_text or (f"stopped by signal {-result.returncode}, past its limit of {cpu} s of "
                                           "CPU")
            raise BadRequest(f"Image {fingerprint[:12]}'s disk could not be converted by qemu-img: {reason}")

    async def delete(self, fingerprint: str) -> None:
        await self._store.delete_image(fingerprint)
        self.path(fingerprint).unlink(missing_ok=True)
        self.disk_path(fingerprint).unlink(missing_ok=True)

    async def set_alias(self, name: str, fingerprint: str, description: str = "") -> None:
        validate_alias_name(name)
        await self._store.set_alias(name, fingerprint, description)
