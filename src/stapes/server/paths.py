"""Where a server keeps its files: everything below one state directory, so servers never share paths."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StatePaths:
    root: Path

    @property
    def unix_socket(self) -> Path:
        return self.root / "unix.socket"

    @property
    def database(self) -> Path:
        return self.root / "database" / "stapes.db"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def lxc_path(self) -> Path:
        """LXC's 'lxcpath': one directory per container with its config and log."""
        return self.root / "containers"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def storage_pools(self) -> Path:
        return self.root / "storage-pools"

    @property
    def migrations(self) -> Path:
        """Working space of migrations in progress (checkpoint images); emptied at start."""
        return self.root / "migrations"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def networks(self) -> Path:
        return self.root / "networks"

    def private_directories(self) -> dict[Path, int]:
        """Who may reach what (docs/security.md): the root is traversable, so that an unprivileged container's
        root (a high host uid) reaches its LXC directory; everything holding secrets, keys, instance files or
        memory is root's alone. The state directory's other users see only the server certificate."""
        return {self.root: 0o711, self.database.parent: 0o700, self.images: 0o700, self.storage_pools: 0o700,
                self.migrations: 0o700, self.logs: 0o700, self.lxc_path: 0o711, self.networks: 0o711}

    @property
    def server_id(self) -> str:
        """Short stable tag that keeps this server's cgroups apart from another's on the same host."""
        return hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:8]
