"""The client's configuration: remotes, the default remote, client certificate and pinned server certificates.

Layout follows Incus: `$STAPES_CONF` (default ~/.config/stapes) holds config.yml, client.crt/key and
servercerts/<remote>.crt. The `local` remote is the unix socket of the server in `$STAPES_DIR`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stapes.api.errors import BadRequest, NotFound

LOCAL = "local"


def config_dir() -> Path:
    env = os.environ.get("STAPES_CONF")
    return Path(env) if env else Path.home() / ".config" / "stapes"


def local_socket() -> Path:
    return Path(os.environ.get("STAPES_DIR", "/var/lib/stapes")) / "unix.socket"


@dataclass
class Remote:
    name: str
    addr: str
    project: str = ""
    protocol: str = "stapes"

    @property
    def is_unix(self) -> bool:
        return self.addr.startswith("unix:")

    def socket_path(self) -> Path:
        path = self.addr.removeprefix("unix:").lstrip("/")
        return Path("/" + path) if path else local_socket()


@dataclass
class ClientConfig:
    directory: Path
    default_remote: str = LOCAL
    remotes: dict[str, Remote] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # Incus's CLI aliases: 'NAME [WORDS]' -> command line

    @classmethod
    def load(cls, directory: Path | None = None) -> ClientConfig:
        directory = directory or config_dir()
        conf = cls(directory)
        path = directory / "config.yml"
        data = yaml.safe_load(path.read_text()) if path.exists() else {}
        data = data or {}
        conf.default_remote = str(data.get("default-remote") or LOCAL)
        for name, body in (data.get("remotes") or {}).items():
            conf.remotes[name] = Remote(name, str(body.get("addr", "")), str(body.get("project") or ""),
                                        str(body.get("protocol") or "stapes"))
        conf.remotes.setdefault(LOCAL, Remote(LOCAL, "unix://"))
        conf.aliases = {str(k): str(v) for k, v in (data.get("aliases") or {}).items()}
        return conf

    def save(self) -> None:
        # The user's alone, as its key is (client.key, 0600): which servers it trusts is nobody else's business.
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = {
            "default-remote": self.default_remote,
            "remotes": {
                r.name: {"addr": r.addr, "project": r.project, "protocol": r.protocol}
                for r in self.remotes.values()
            },
        }
        if self.aliases:
            data["aliases"] = dict(self.aliases)
        tmp = self.directory / "config.yml.tmp"
        tmp.write_text(yaml.safe_dump(data, sort_keys=True))
        tmp.replace(self.directory / "config.yml")

    def remote(self, name: str) -> Remote:
        remote = self.remotes.get(name)
        if remote is None:
            known = ", ".join(sorted(self.remotes))
            raise NotFound(f"Remote {name!r} does not exist (known remotes: {known}); add it with 'stapes remote add'")
        return remote

    def parse(self, spec: str) -> tuple[Remote, str]:
        """'[remote:]name' -> (remote, name); the default remote when no remote is given."""
        if ":" in spec:
            remote_name, _, name = spec.partition(":")
            if not remote_name:
                raise BadRequest(f"{spec!r}: the remote name before ':' is empty")
            return self.remote(remote_name), name
        return self.remote(self.default_remote), spec

    @property
    def client_cert(self) -> Path:
        return self.directory / "client.crt"

    @property
    def client_key(self) -> Path:
        return self.directory / "client.key"

    def rename_remote(self, old: str, new: str) -> None:
        """Rename a remote with its pinned certificate; the default remote follows (the caller saves)."""
        remote = self.remote(old)
        if new in self.remotes:
            raise BadRequest(f"Remote {new!r} already exists")
        if not new or ":" in new or "/" in new:
            raise BadRequest(f"Invalid remote name {new!r}: it cannot be empty or contain ':' or '/'")
        if old == LOCAL:
            raise BadRequest("The local remote cannot be renamed")
        cert = self.server_cert(old)
        if cert.exists():
            cert.replace(self.server_cert(new))
        del self.remotes[old]
        remote.name = new
        self.remotes[new] = remote
        if self.default_remote == old:
            self.default_remote = new

    def server_cert(self, remote: str) -> Path:
        return self.directory / "servercerts" / f"{remote}.crt"
