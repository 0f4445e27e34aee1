"""Who is calling: root over the unix socket, a trusted TLS client, or an untrusted one.

The trust store is the certificates table, cached in memory (every HTTPS request consults it). Trust tokens
are single-use secrets with an expiry, created by a trusted caller and spent by an untrusted one to add its
own certificate; the database keeps only their hashes.
"""

from __future__ import annotations

import hashlib
import secrets
import socket
import struct
import time
from dataclasses import dataclass

from aiohttp import web

from stapes.api.errors import Forbidden
from stapes.certs import der_to_pem, fingerprint_der
from stapes.server.store.db import CertificateRow, Store, TokenRow


@dataclass(frozen=True)
class Caller:
    trusted: bool
    via_unix: bool
    fingerprint: str | None
    certificate_pem: str | None
    name: str


class TrustStore:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._by_fingerprint: dict[str, CertificateRow] = {}

    async def load(self) -> None:
        self._by_fingerprint = {row.fingerprint: row for row in await self._store.certificates()}
        for token in await self._store.tokens():  # an older server kept the secrets themselves
            if not token.secret.startswith("sha256:"):
                await self._store.rename_token(token.secret, token_hash(token.secret))

    def is_trusted(self, fingerprint: str) -> bool:
        return fingerprint in self._by_fingerprint

    def certificates(self) -> list[CertificateRow]:
        return sorted(self._by_fingerprint.values(), key=lambda row: row.name)

    async def add(self, row: CertificateRow) -> None:
        await self._store.add_certificate(row)
        self._by_fingerprint[row.fingerprint] = row

    async def remove(self, fingerprint: str) -> None:
        await self._store.delete_certificate(fingerprint)
        self._by_fingerprint.pop(fingerprint, None)

    async def create_token(self, name: str, lifetime: float, operation: str) -> TokenRow:
        expires = time.time() + lifetime if lifetime > 0 else 0.0
        secret = secrets.token_hex(32)
        await self._store.add_token(TokenRow(token_hash(secret), name, expires, operation))
        return TokenRow(secret, name, expires, operation)  # the only time the secret itself is known

    async def spend_token(self, secret: str) -> TokenRow:
        row = await self._store.take_token(token_hash(secret))
        if row is None:
            raise Forbidden("The trust token is not valid: it was already used, revoked or never issued")
        if row.expires_at and row.expires_at < time.time():
            raise Forbidden("The trust token has expired: ask for a new one with 'stapes config trust add'")
        return row


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a unix socket (SO_PEERCRED); -1 when it cannot be told."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return -1
    return int(struct.unpack("3i", creds)[1])


def token_hash(secret: str) -> str:
    """What the database keeps of a trust token: its SHA-256, compared as a password's hash would be (the
    secret has 256 random bits, so no salt or slow hash is needed)."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


def identify(request: web.Request, trust: TrustStore) -> Caller:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport else None
    if sock is not None and sock.family == socket.AF_UNIX:
        # The socket is root's and its group's, but only root is trusted on it: the kernel says who connected.
        uid = peer_uid(sock)
        return Caller(trusted=uid == 0, via_unix=True, fingerprint=None, certificate_pem=None,
                      name="local" if uid == 0 else f"local uid {uid}")
    ssl_object = transport.get_extra_info("ssl_object") if transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        return Caller(trusted=False, via_unix=False, fingerprint=None, certificate_pem=None, name="anonymous")
    fingerprint = fingerprint_der(der)
    return Caller(
        trusted=trust.is_trusted(fingerprint), via_unix=False, fingerprint=fingerprint,
        certificate_pem=der_to_pem(der), name=fingerprint[:12],
    )
