"""Async HTTP and websocket access to one server: unix socket or pinned-certificate TLS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from stapes.api.errors import BadRequest, StapesError, Unavailable, error_for_status
from stapes.api.redact import redact
from stapes.certs import client_ssl_context
from stapes.client.config import ClientConfig, Remote

Json = Any
http_log = logging.getLogger("stapes.client.http")  # `stapes --debug` shows each request and response here


class Connection:
    """One remote. Every response is unwrapped: sync -> metadata, async -> operation body, error -> raise."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession, description: str, project: str = "") -> None:
        self.base_url = base_url
        self.session = session
        self.description = description
        self.project = project

    @classmethod
    def open(cls, config: ClientConfig, remote: Remote, *, pinned_pem: str | None = None,
             insecure: bool = False) -> Connection:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        if remote.is_unix:
            connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=str(remote.socket_path()))
            session = aiohttp.ClientSession(connector=connector, timeout=timeout)
            return cls("http://stapes", session, f"the local server ({remote.socket_path()})", remote.project)
        if pinned_pem is None and not insecure:
            cert_path = config.server_cert(remote.name)
            if not cert_path.exists():
                raise BadRequest(
                    f"No pinned certificate for remote {remote.name!r}: add the remote again with a trust token")
            pinned_pem = cert_path.read_text()
        context = client_ssl_context(config.client_cert, config.client_key, None if insecure else pinned_pem)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context), timeout=timeout)
        return cls(remote.addr.rstrip("/"), session, f"remote {remote.name!r} ({remote.addr})", remote.project)

    async def close(self) -> None:
        await self.session.close()

    def _params(self, params: dict[str, str] | None, project: str | None) -> dict[str, str]:
        merged = dict(params or {})
        chosen = project if project is not None else self.project
        if chosen and "project" not in merged:
            merged["project"] = chosen
        return merged

    async def request(self, method: str, path: str, body: Json = None, *, params: dict[str, str] | None = None,
                      project: str | None = None, data: Any = None, headers: dict[str, str] | None = None) -> Json:
        url = self.base_url + path
        kwargs: dict[str, Any] = {"params": self._params(params, project), "headers": headers or {}}
        if body is not None:
            kwargs["json"] = body
        if data is not None:
            kwargs["data"] = data
        try:
            http_log.debug("%s %s %s%s", method, url, kwargs["params"] or "", f" {json.dumps(body)}" if body else "")
            async with self.session.request(method, url, **kwargs) as response:
                text = await response.text()
            http_log.debug("%s %s -> %s %s", method, path, response.status, text[:2000].strip())
        except aiohttp.ClientConnectorCertificateError:
            raise Unavailable(f"The certificate of {self.description} does not match the pinned one: "
                              "if the server was re-created, remove and add the remote again") from None
        except (aiohttp.ClientConnectionError, OSError) as err:
            raise Unavailable(f"Cannot reach {self.description}: {err}; is stapesd running?") from None
        try:
            envelope = json.loads(text)
        except json.JSONDecodeError:
            if response.status >= 400:
                raise error_for_status(response.status, text.strip() or response.reason or "error") from None
            return text
        if envelope.get("type") == "error":
            raise error_for_status(int(envelope.get("error_code") or response.status), str(envelope.get("error")))
        if envelope.get("type") == "async":
            return envelope["metadata"]
        return envelope.get("metadata")

    async def raw(self, path: str, *, project: str | None = None) -> bytes:
        try:
            async with self.session.get(self.base_url + path, params=self._params(None, project)) as response:
                data = await response.read()
        except (aiohttp.ClientConnectionError, OSError) as err:
            raise Unavailable(f"Cannot reach {self.description}: {err}") from None
        if response.status >= 400:
            try:
                envelope = json.loads(data)
                raise error_for_status(response.status, str(envelope.get("error")))
            except (json.JSONDecodeError, AttributeError):
                raise error_for_status(response.status, data.decode(errors="replace")) from None
        return data

    async def wait(self, op: Json, timeout: float = -1) -> Json:
        """Wait for an operation to finish; raise its error if it failed."""
        op_id = op["id"]
        while True:
            step = 30.0 if timeout < 0 else min(timeout, 30.0)
            result = await self._wait_once(op_id, step)
            if result["status_code"] >= 200:
                break
            if timeout >= 0:
                timeout -= step
                if timeout <= 0:
                    break
        if result["status_code"] != 200:
            raise StapesError(result.get("err") or result["status"])
        return result

    async def _wait_once(self, op_id: str, seconds: float) -> Json:
        """The operation once it finished or `seconds` passed. Incus 6.0 answers a wait that ran out before the
        operation finished with an error ("context deadline exceeded") instead of the operation: then the
        operation is read as it is."""
        try:
            result: Json = await self.request("GET", f"/1.0/operations/{op_id}/wait", params=_wait_params(seconds))
        except StapesError as err:
            if "deadline exceeded" not in err.message:
                raise
            result = await self.request("GET", f"/1.0/operations/{op_id}")
        return result

    async def poll_until_done(self, op: Json) -> Json:
        """The operation once it is final, failed or not (no exception for a failure)."""
        async for current in self.poll(op, 30.0):
            if current["status_code"] >= 200:
                return current
        return await self.request("GET", f"/1.0/operations/{op['id']}")

    async def poll(self, op: Json, interval: float = 1.0) -> AsyncIterator[Json]:
        """Yield the operation each time it may have changed, until it is final."""
        op_id = op["id"]
        while True:
            current = await self._wait_once(op_id, interval)
            yield current
            if current["status_code"] >= 200:
                return

    @contextlib.asynccontextmanager
    async def websocket(self, path: str, params: dict[str, str] | None = None
                        ) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
        url = self.base_url + path
        try:
            ws = await self.session.ws_connect(url, params=params or {}, max_msg_size=0, autoping=True)
        except (aiohttp.ClientConnectionError, aiohttp.WSServerHandshakeError, OSError) as err:
            raise Unavailable(f"Cannot open websocket {path} on {self.description}: {redact(str(err))}") from None
        try:
            yield ws
        finally:
            await ws.close()

    async def operation_websocket(self, op: Json, secret: str
                                  ) -> contextlib.AbstractAsyncContextManager[aiohttp.ClientWebSocketResponse]:
        return self.websocket(f"/1.0/operations/{op['id']}/websocket", {"secret": secret})


async def fetch_server_certificate(address: str) -> bytes:
    """The DER certificate a server presents, read without trusting it (to compare with a token)."""
    host, _, port = address.removeprefix("https://").rstrip("/").rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port or 8443), ssl=context), 10)
    except (OSError, TimeoutError) as err:
        raise Unavailable(f"Cannot reach {address}: {err}") from None
    ssl_object = writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    if not der:
        raise Unavailable(f"{address} presented no certificate")
    return bytes(der)


def _wait_params(seconds: float) -> dict[str, str]:
    """Whole seconds, at least one: Incus parses `timeout` as an integer (a fractional one is an error there),
    and 0 would not wait at all."""
    return {"timeout": str(max(1, math.ceil(seconds)))}
