"""Opening another server's operation websockets: our server certificate as the client certificate, the peer's
certificate pinned (the one the client handed over in the request)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from stapes.api.errors import BadRequest, Unavailable
from stapes.api.redact import redact, url_without_query
from stapes.certs import client_ssl_context
from stapes.server.streams import CLOSE_TIMEOUT, MAX_MESSAGE, Channel


@contextlib.asynccontextmanager
async def dial(operation_url: str, secrets: dict[str, str], names: tuple[str, ...], certificate: str,
               cert: Path, key: Path, peer: str = "peer") -> AsyncIterator[dict[str, Channel]]:
    if not operation_url.startswith("https://"):
        raise BadRequest(f"The peer operation {url_without_query(operation_url)!r} must be an https:// URL")
    missing = [n for n in names if n not in secrets]
    if missing:
        raise BadRequest(f"No secret given for the {', '.join(missing)} websocket(s)")
    if not certificate:
        raise BadRequest("The peer's certificate is required (it is pinned for the transfer)")
    context = client_ssl_context(cert, key, certificate)
    # Connecting is bounded; the sockets themselves live as long as the migration (bounded by its idle timeout).
    timeout = aiohttp.ClientTimeout(total=None, connect=30, sock_connect=15, sock_read=None)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context), timeout=timeout) as session:
        channels: dict[str, Channel] = {}
        try:
            for name in names:
                try:
                    ws = await session.ws_connect(f"{operation_url}/websocket", params={"secret": secrets[name]},
                                                  max_msg_size=MAX_MESSAGE, heartbeat=30,
                                                  timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT))
                except aiohttp.WSServerHandshakeError as err:
                    # The peer answered, and refused: its operation has ended (it failed, and says why
                    # itself) or the secret was spent. Never its URL: aiohttp's text carries the secret.
                    raise Unavailable(f"The {peer} refused the {name} websocket with HTTP {err.status} (its "
                                      "operation had ended)") from None
                except (aiohttp.ClientError, OSError) as err:
                    raise Unavailable(f"Cannot open the {name} websocket of {url_without_query(operation_url)}: "
                                      f"{redact(str(err))}") from None
                channels[name] = Channel(name, ws)
            yield channels
        finally:
            await asyncio.gather(*(channel.close() for channel in channels.values()))
