"""CRIU as the LXC driver uses it: which binary, whether it works on this kernel, with what configuration,
and what its statistics images say.

The daemon probes CRIU once at start. liblxc runs `criu` from PATH, so the binary the setup built goes first
on the PATH of the `lxc-checkpoint` children, and our configuration file reaches CRIU through
CRIU_CONFIG_FILE (nothing written to /etc).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from stapes.server import process

OWN_BUILD = Path(os.environ.get("STAPES_CRIU_PREFIX", "/opt/stapes/criu"))
MINIMUM = (4, 2)
LAZY_PIPE_SIZE = 4 << 20  # CRIU's lazy pages splice whole page runs through pipes of this size
# Locking the network with nftables: no iptables here, and Debian 12/13 hosts use nftables anyway.
CONFIG = "network-lock nftables\n"


@dataclass(frozen=True)
class CriuSupport:
    """What CRIU can do here; each `*_refusal` is None when the feature works, or says why not."""

    binary: Path | None
    version: str
    refusal: str | None
    patched: bool = False  # our build: restores unprivileged containers' veths
    dirty_tracking_refusal: str | None = "CRIU is not available"
    lazy_refusal: str | None = "CRIU is not available"
    config_file: Path | None = None

    def environment(self) -> dict[str, str]:
        """The environment of an lxc-checkpoint child: our criu first on PATH, our config file."""
        env = dict(os.environ)
        if self.binary is not None:
            env["PATH"] = f"{self.binary.parent}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        if self.config_file is not None:
            env["CRIU_CONFIG_FILE"] = str(self.config_file)
        return env

    def to_json(self) -> dict[str, object]:
        return {"available": self.refusal is None, "reason": self.refusal or "", "version": self.version,
                "binary": str(self.binary or ""), "incremental_memory": self.dirty_tracking_refusal is None,
                "incremental_memory_reason": self.dirty_tracking_refusal or "",
                "lazy_pages": self.lazy_refusal is None, "lazy_pages_reason": self.lazy_refusal or ""}


def parse_version(text: str) -> tuple[int, ...] | None:
    """`criu --version` prints 'Version: 4.2.1' (pure: unit-tested)."""
    match = re.search(r"^Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", text, re.MULTILINE)
    return tuple(int(part) for part in match.groups() if part is not None) if match else None


def _candidates() -> list[Path]:
    found = [Path(p) for p in (os.environ.get("STAPES_CRIU", ""),) if p]
    found.append(OWN_BUILD / "sbin/criu")
    if system := shutil.which("criu"):
        found.append(Path(system))
    return [path for path in found if path.is_file() and os.access(path, os.X_OK)]


async def probe(state_dir: Path) -> CriuSupport:
    """Find a CRIU that is new enough and passes `criu check` on this kernel; say why not otherwise."""
    config_file = state_dir / "criu.conf"
    config_file.write_text(CONFIG)
    env = CriuSupport(None, "", None, config_file=config_file).environment()
    reasons = []
    for binary in _candidates():
        result = await process.run([str(binary), "--version"], check=False, timeout=30)
        version = parse_version(result.stdout.decode(errors="replace"))
        shown = ".".join(map(str, version)) if version else "unknown"
        if version is None or version[:2] < MINIMUM:
            reasons.append(f"{binary} is CRIU {shown}, older than 4.2 (3.17 and 4.1 fail on this kernel)")
            continue
        check = await process.run([str(binary), "check"], check=False, timeout=60, env=env)
        if check.returncode != 0:
            reasons.append(f"'{binary} check' fails: {check.error_text}")
            continue
        dirty = await process.run([str(binary), "check", "--feature", "mem_dirty_track"], check=False, timeout=60,
                                  env=env)
        return CriuSupport(
            binary, shown, None, patched=binary.parent.parent == OWN_BUILD and (OWN_BUILD / "BUILD").exists(),
            dirty_tracking_refusal=None if dirty.returncode == 0 else (
                "this kernel has no soft-dirty memory tracking (criu check --feature mem_dirty_track fails), so "
                "memory cannot be copied in rounds: one final dump instead"),
            lazy_refusal=await _lazy_refusal(binary, env), config_file=config_file)
    if not reasons:
        reasons.append("CRIU is not installed: run 'make install' (scripts/setup-criu.sh builds CRIU 4.2.1)")
    return CriuSupport(None, "", "; ".join(reasons), config_file=config_file)


async def _lazy_refusal(binary: Path, env: Mapping[str, str]) -> str | None:
    check = await process.run([str(binary), "check", "--feature", "uffd-noncoop"], check=False, timeout=60, env=env)
    if check.returncode != 0:
        return "the kernel lacks non-cooperative userfaultfd (criu check --feature uffd-noncoop fails)"
    size = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    if size < LAZY_PIPE_SIZE:
        return (f"fs.pipe-max-size is {size} bytes; lazy pages need {LAZY_PIPE_SIZE}: "
                f"'sysctl fs.pipe-max-size={LAZY_PIPE_SIZE}' (make install sets it)")
    return None


@dataclass(frozen=True)
class DumpStats:
    """A (pre-)dump round's figures from its `stats-dump` image, times in microseconds."""

    frozen_time: int
    memdump_time: int
    memwrite_time: int
    pages_scanned: int
    pages_skipped_parent: int
    pages_written: int



SERVICE_MAGIC = 0x55105940
STATS_MAGIC = 0x57093306
_DUMP_FIELDS = {2: "frozen_time", 3: "memdump_time", 4: "memwrite_time", 5: "pages_scanned",
                6: "pages_skipped_parent", 7: "pages_written"}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes) -> dict[int, int | bytes]:
    """One protobuf message's top-level fields (varints and length-delimited ones only: all stats has)."""
    fields: dict[int, int | bytes] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            fields[number], pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ValueError("truncated field")
            fields[number], pos = data[pos:pos + length], pos + length
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return fields


def parse_dump_stats(image: bytes) -> DumpStats:
    """CRIU's `stats-dump` image: service magic, stats magic, size, then a stats_entry message whose field 1
    is the dump_stats_entry (pure: unit-tested on images recorded from CRIU)."""
    if len(image) < 12:
        raise ValueError("not a CRIU stats image: too short")
    service, magic, size = struct.unpack_from("<III", image)
    if (service, magic) != (SERVICE_MAGIC, STATS_MAGIC) or 12 + size > len(image):
        raise ValueError("not a CRIU stats image")
    dump = _fields(image[12:12 + size]).get(1)
    if not isinstance(dump, bytes):
        raise ValueError("the stats image holds no dump statistics")
    values = _fields(dump)
    figures = {name: values.get(number, 0) for number, name in _DUMP_FIELDS.items()}
    return DumpStats(**{name: int(value) if isinstance(value, int) else 0 for name, value in figures.items()})
