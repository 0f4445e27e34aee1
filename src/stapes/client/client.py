"""The Stapes client library: typed calls over the REST API, used by the CLI, the tests and scripts.

`AsyncClient` is the core; `Client` is a thin synchronous facade over it for scripts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import aiohttp

from stapes.api.errors import BadRequest, Conflict, Forbidden, StapesError
from stapes.api.tokens import decode_token
from stapes.certs import der_to_pem, ensure_certificate, fingerprint_der
from stapes.client import console
from stapes.client.config import ClientConfig, Remote
from stapes.client.connection import Connection, Json, fetch_server_certificate

T = TypeVar("T")
Progress = Callable[[Json], None]

# Collections with the same REST shape: list/get/create/put/patch/delete/rename.
COLLECTIONS = {"profile": "/1.0/profiles", "project": "/1.0/projects", "pool": "/1.0/storage-pools",
               "network": "/1.0/networks"}


class AsyncClient:
    def __init__(self, connection: Connection, remote: Remote) -> None:
        self.conn = connection
        self.remote = remote

    @classmethod
    def connect(cls, remote_name: str | None = None, config: ClientConfig | None = None,
                project: str | None = None) -> AsyncClient:
        config = config or ClientConfig.load()
        remote = config.remote(remote_name or config.default_remote)
        conn = Connection.open(config, remote)
        if project:
            conn.project = project
        return cls(conn, remote)

    async def close(self) -> None:
        await self.conn.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def run_operation(self, op: Json, progress: Progress | None = None) -> Json:
        if progress is None:
            return await self.conn.wait(op)
        async for current in self.conn.poll(op):
            progress(current)
        return await self.conn.wait(op)

    # server
    async def server(self) -> Json:
        return await self.conn.request("GET", "/1.0")

    async def update_server_config(self, config: dict[str, str], *, replace: bool = False) -> None:
        await self.conn.request("PUT" if replace else "PATCH", "/1.0", {"config": config})

    # instances
    async def instances(self, *, recursion: int = 1, all_projects: bool = False, project: str | None = None
                        ) -> list[Json]:
        params = {"recursion": str(recursion)}
        if all_projects:
            params["all-projects"] = "true"
        result: list[Json] = await self.conn.request("GET", "/1.0/instances", params=params, project=project)
        return result

    async def instance(self, name: str, *, with_state: bool = False) -> Json:
        return await self.conn.request("GET", f"/1.0/instances/{name}",
                                       params={"recursion": "1" if with_state else "0"})

    async def create_instance(self, body: Json, progress: Progress | None = None) -> Json:
        op = await self.conn.request("POST", "/1.0/instances", body)
        return await self.run_operation(op, progress)

    async def update_instance(self, name: str, body: Json, *, patch: bool = True) -> None:
        result = await self.conn.request("PATCH" if patch else "PUT", f"/1.0/instances/{name}", body)
        if isinstance(result, dict) and "id" in result and "class" in result:
            await self.conn.wait(result)

    async def rename_instance(self, name: str, new_name: str) -> None:
        await self.conn.wait(await self.conn.request("POST", f"/1.0/instances/{name}", {"name": new_name}))

    async def delete_instance(self, name: str) -> None:
        await self.conn.wait(await self.conn.request("DELETE", f"/1.0/instances/{name}"))

    async def instance_state(self, name: str) -> Json:
        return await self.conn.request("GET", f"/1.0/instances/{name}/state")

    async def change_state(self, name: str, action: str, *, timeout: float = -1, force: bool = False,
                           progress: Progress | None = None) -> None:
        op = await self.conn.request("PUT", f"/1.0/instances/{name}/state",
                                     {"action": action, "timeout": timeout, "force": force})
        await self.run_operation(op, progress)

    async def snapshots(self, name: str) -> list[Json]:
        result: list[Json] = await self.conn.request("GET", f"/1.0/instances/{name}/snapshots",
                                                     params={"recursion": "1"})
        return result

    async def create_snapshot(self, name: str, snapshot: str = "") -> None:
        await self.conn.wait(await self.conn.request("POST", f"/1.0/instances/{name}/snapshots", {"name": snapshot}))

    async def delete_snapshot(self, name: str, snapshot: str) -> None:
        await self.conn.wait(await self.conn.request("DELETE", f"/1.0/instances/{name}/snapshots/{snapshot}"))

    async def rename_snapshot(self, name: str, snapshot: str, new_name: str) -> None:
        await self.conn.wait(await self.conn.request("POST", f"/1.0/instances/{name}/snapshots/{snapshot}",
                                                     {"name": new_name}))

    async def restore_snapshot(self, name: str, snapshot: str) -> None:
        await self.conn.wait(await self.conn.request("PUT", f"/1.0/instances/{name}", {"restore": snapshot}))

    async def instance_logs(self, name: str) -> list[str]:
        result: list[str] = await self.conn.request("GET", f"/1.0/instances/{name}/logs")
        return result

    async def instance_log(self, name: str, file: str) -> bytes:
        return await self.conn.raw(f"/1.0/instances/{name}/logs/{file}")

    async def console(self, name: str, *, stdin: BinaryIO, stdout: BinaryIO, size: tuple[int, int] = (80, 24),
                      attached: Callable[[], None] | None = None) -> bool:
        """Attach to an instance's console until Ctrl+a q; whether the server ended it (stapes.client.console)."""
        return await console.attach(self.conn, name, stdin, stdout, size, attached)

    async def console_log(self, name: str) -> bytes:
        return await console.show_log(self.conn, name)

    # backups (export and import: stapes.client.backups)
    async def backups(self, name: str) -> list[Json]:
        result: list[Json] = await self.conn.request("GET", f"/1.0/instances/{name}/backups", params={"recursion": "1"})
        return result

    async def create_backup(self, name: str, body: Json, progress: Progress | None = None) -> Json:
        return await self.run_operation(await self.conn.request("POST", f"/1.0/instances/{name}/backups", body),
                                        progress)

    async def delete_backup(self, name: str, backup: str) -> None:
        await self.conn.wait(await self.conn.request("DELETE", f"/1.0/instances/{name}/backups/{backup}"))

    async def download_backup(self, name: str, backup: str, sink: BinaryIO,
                              progress: Callable[[int, int | None], None] | None = None) -> int:
        from stapes.client.backups import download
        return await download(self.conn, f"/1.0/instances/{name}/backups/{backup}/export", sink, progress)

    async def import_backup(self, source: BinaryIO, *, pool: str = "", name: str = "", size: int | None = None,
                            upload_progress: Callable[[int, int | None], None] | None = None,
                            progress: Progress | None = None) -> Json:
        from stapes.client.backups import upload
        op = await upload(self.conn, source, pool=pool, name=name, size=size, progress=upload_progress)
        return await self.run_operation(op, progress)

    async def exec(self, name: str, command: list[str], *, environment: dict[str, str] | None = None,
                   cwd: str = "", user: int = 0, group: int = 0, interactive: bool = False,
                   stdin: BinaryIO | None = None, stdout: BinaryIO | None = None, stderr: BinaryIO | None = None,
                   size: tuple[int, int] = (80, 24), forward_signals: bool = False) -> int:
        """Run a command in an instance, streaming stdio; returns its exit status."""
        body = {"command": command, "environment": environment or {}, "cwd": cwd, "user": user, "group": group,
                "interactive": interactive, "wait-for-websocket": True, "record-output": False,
                "width": size[0], "height": size[1]}
        op = await self.conn.request("POST", f"/1.0/instances/{name}/exec", body)
        fds = op["metadata"]["fds"]
        return await _ExecStreams(self.conn, op, fds, interactive, stdin, stdout, stderr, forward_signals).run()

    # images
    async def images(self) -> list[Json]:
        result: list[Json] = await self.conn.request("GET", "/1.0/images", params={"recursion": "1"})
        return result

    async def image(self, name: str) -> Json:
        aliases = {a["name"]: a["target"] for a in await self.aliases()}
        return await self.conn.request("GET", f"/1.0/images/{aliases.get(name, name)}")

    async def import_image(self, tarball: Path, aliases: list[str], progress: Progress | None = None) -> Json:
        headers = {"Content-Type": "application/octet-stream", "X-Incus-aliases": ",".join(aliases)}
        with tarball.open("rb") as handle:
            op = await self.conn.request("POST", "/1.0/images", data=handle, headers=headers)
        return await self.run_operation(op, progress)

    async def build_image(self, builtin: str, aliases: list[str], progress: Progress | None = None) -> Json:
        op = await self.conn.request("POST", "/1.0/images", {
            "source": {"type": "builtin", "name": builtin}, "aliases": [{"name": a} for a in aliases]})
        return await self.run_operation(op, progress)

    async def delete_image(self, name: str) -> None:
        image = await self.image(name)
        await self.conn.wait(await self.conn.request("DELETE", f"/1.0/images/{image['fingerprint']}"))

    async def aliases(self) -> list[Json]:
        result: list[Json] = await self.conn.request("GET", "/1.0/images/aliases", params={"recursion": "1"})
        return result

    async def create_alias(self, name: str, target: str, description: str = "") -> None:
        await self.conn.request("POST", "/1.0/images/aliases",
                                {"name": name, "target": target, "description": description})

    async def delete_alias(self, name: str) -> None:
        await self.conn.request("DELETE", f"/1.0/images/aliases/{name}")

    # profiles, projects, storage pools
    async def collection(self, kind: str) -> list[Json]:
        result: list[Json] = await self.conn.request("GET", COLLECTIONS[kind], params={"recursion": "1"})
        return result

    async def entity(self, kind: str, name: str) -> Json:
        return await self.conn.request("GET", f"{COLLECTIONS[kind]}/{name}")

    async def create_entity(self, kind: str, body: Json) -> None:
        await self.conn.request("POST", COLLECTIONS[kind], body)

    async def update_entity(self, kind: str, name: str, body: Json, *, patch: bool = True) -> None:
        await self.conn.request("PATCH" if patch else "PUT", f"{COLLECTIONS[kind]}/{name}", body)

    async def rename_entity(self, kind: str, name: str, new_name: str) -> None:
        await self.conn.request("POST", f"{COLLECTIONS[kind]}/{name}", {"name": new_name})

    async def delete_entity(self, kind: str, name: str) -> None:
        await self.conn.request("DELETE", f"{COLLECTIONS[kind]}/{name}")

    async def network_state(self, name: str) -> Json:
        return await self.conn.request("GET", f"/1.0/networks/{name}/state")

    async def network_leases(self, name: str) -> list[Json]:
        result: list[Json] = await self.conn.request("GET", f"/1.0/networks/{name}/leases")
        return result

    async def pool_resources(self, name: str) -> Json:
        return await self.conn.request("GET", f"/1.0/storage-pools/{name}/resources")

    # trust
    async def certificates(self) -> list[Json]:
        result: list[Json] = await self.conn.request("GET", "/1.0/certificates", params={"recursion": "1"})
        return result

    async def create_token(self, client_name: str) -> str:
        op = await self.conn.request("POST", "/1.0/certificates",
                                     {"name": client_name, "type": "client", "token": True})
        return str(op["metadata"]["token"])

    async def remove_certificate(self, fingerprint: str) -> None:
        await self.conn.request("DELETE", f"/1.0/certificates/{fingerprint}")

    # operations and events
    async def operations(self) -> list[Json]:
        grouped = await self.conn.request("GET", "/1.0/operations", params={"recursion": "1"})
        return [op for ops in grouped.values() for op in ops]

    async def operation(self, op_id: str) -> Json:
        return await self.conn.request("GET", f"/1.0/operations/{op_id}")

    async def cancel_operation(self, op_id: str) -> None:
        await self.conn.request("DELETE", f"/1.0/operations/{op_id}")

    async def events(self, types: list[str], all_projects: bool = False) -> AsyncIterator[Json]:
        params = {"type": ",".join(types)}
        if all_projects:
            params["all-projects"] = "true"
        async with self.conn.websocket("/1.0/events", params) as ws:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    yield msg.json()
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    return


async def add_remote_with_token(config: ClientConfig, name: str, token: str, address: str | None = None) -> Remote:
    """Incus's token flow: check the server's certificate against the token, pin it, then trust ourselves."""
    if ":" in name:
        raise BadRequest("Remote names may not contain ':'")
    if name in config.remotes:
        raise Conflict(f"Remote {name!r} already exists ({config.remotes[name].addr}); remove it first")
    try:
        body = decode_token(token)
    except ValueError as err:
        raise BadRequest(f"Invalid trust token: {err}") from None
    candidates = [address] if address else [f"https://{a}" for a in body.get("addresses") or []]
    if not candidates:
        raise BadRequest("The token names no server address: give the URL (stapes remote add NAME URL --token T)")
    ensure_certificate(config.client_cert, config.client_key, server=False)
    errors = []
    for url in candidates:
        url = url if url.startswith("https://") else f"https://{url}"
        if url.count(":") < 2:
            url += ":8443"
        try:
            der = await fetch_server_certificate(url)
        except Exception as err:
            errors.append(str(err))
            continue
        if fingerprint_der(der) != body["fingerprint"]:
            raise Forbidden(f"The certificate of {url} does not match the token: refusing to trust it")
        remote = Remote(name, url)
        pem = der_to_pem(der)
        conn = Connection.open(config, remote, pinned_pem=pem)
        try:
            with contextlib.suppress(Conflict):
                await conn.request("POST", "/1.0/certificates",
                                   {"type": "client", "trust_token": token, "name": str(body.get("client_name", ""))})
            info = await conn.request("GET", "/1.0")
        finally:
            await conn.close()
        if info.get("auth") != "trusted":
            raise Forbidden(f"{url} still does not trust this client after the token was accepted")
        cert_path = config.server_cert(name)
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        cert_path.write_text(pem)
        config.remotes[name] = remote
        config.save()
        return remote
    raise BadRequest("None of the token's addresses answered: " + "; ".join(errors))


class ExecError(StapesError):
    """An exec whose command could not run ("Command not found"); `code` is the exit status to pass on (127)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class _ExecStreams:
    """The websockets of one exec. Interactive: "0" both ways, ended by an empty text message (Incus's
    barrier); SIGWINCH sends the terminal's size, SIGTERM and SIGHUP are forwarded and end the session here
    too (the caller restores its terminal and exits 128 + the signal)."""

    def __init__(self, conn: Connection, op: Json, fds: dict[str, str], interactive: bool, stdin: BinaryIO | None,
                 stdout: BinaryIO | None, stderr: BinaryIO | None, forward_signals: bool) -> None:
        self.conn, self.op, self.fds, self.interactive = conn, op, fds, interactive
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.forward_signals = forward_signals
        self.hangup: asyncio.Future[int] | None = None
        self.sent: asyncio.Future[None] | None = None

    async def run(self) -> int:
        async with contextlib.AsyncExitStack() as stack:
            sockets = {}
            for name in (["control", "0"] if self.interactive else ["control", "0", "1", "2"]):
                sockets[name] = await stack.enter_async_context(
                    await self.conn.operation_websocket(self.op, self.fds[name]))
            outputs = [asyncio.create_task(self._output(sockets["0"], self.stdout))] if self.interactive else [
                asyncio.create_task(self._output(sockets["1"], self.stdout)),
                asyncio.create_task(self._output(sockets["2"], self.stderr)),
            ]
            feeder = asyncio.create_task(self._input(sockets["0"]))
            control = sockets["control"]
            # The server closes the control socket when the command ends; reading it answers that close.
            drain = asyncio.create_task(self._output(control, None))
            loop = asyncio.get_running_loop()
            self.hangup = loop.create_future()
            handled: list[signal.Signals] = []
            if self.forward_signals:
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    loop.add_signal_handler(sig, self._send_signal, control, int(sig))
                    handled.append(sig)
                if self.interactive:
                    loop.add_signal_handler(signal.SIGWINCH, self._send_resize, control)
                    handled.append(signal.SIGWINCH)
            waiter = asyncio.ensure_future(self.conn.poll_until_done(self.op))
            try:
                await asyncio.wait({waiter, self.hangup}, return_when=asyncio.FIRST_COMPLETED)
                if self.hangup.done():
                    if self.sent is not None:  # the signal on its way before the sockets close
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(self.sent, 2)
                    return 128 + self.hangup.result()
                result = waiter.result()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.gather(*outputs), 10)
            finally:
                for sig in handled:
                    loop.remove_signal_handler(sig)
                for task in (waiter, feeder, drain, *outputs):
                    task.cancel()
            code = int((result.get("metadata") or {}).get("return", -1))
            if result["status_code"] != 200:
                message = result.get("err") or result["status"]
                raise ExecError(message, code) if code >= 0 else StapesError(message)
            return code

    async def _output(self, ws: aiohttp.ClientWebSocketResponse, sink: BinaryIO | None) -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                if sink is not None:
                    sink.write(msg.data)
                    sink.flush()
            elif msg.type != aiohttp.WSMsgType.TEXT or (self.interactive and not msg.data):
                break  # a close, or the barrier that ends an interactive session's output

    async def _input(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        if self.stdin is None:
            if not self.interactive:
                await ws.close()
            return
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        fd = self.stdin.fileno()

        def reader() -> None:
            while True:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    data = b""
                loop.call_soon_threadsafe(queue.put_nowait, data)
                if not data:
                    return

        threading.Thread(target=reader, daemon=True, name="exec stdin").start()
        while data := await queue.get():
            await ws.send_bytes(data)
        if not self.interactive:
            await ws.close()

    def _send_signal(self, ws: aiohttp.ClientWebSocketResponse, signum: int) -> None:
        self.sent = asyncio.ensure_future(ws.send_json({"command": "signal", "signal": signum}))
        if self.interactive and signum in (signal.SIGTERM, signal.SIGHUP) and self.hangup and not self.hangup.done():
            self.hangup.set_result(signum)

    def _send_resize(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            size = os.get_terminal_size(self.stdout.fileno() if self.stdout is not None else 1)
        except (OSError, ValueError):
            return
        asyncio.ensure_future(ws.send_json({"command": "window-resize",
                                            "args": {"width": str(size.columns), "height": str(size.lines)}}))


class Client:
    """Synchronous facade: each method runs the matching AsyncClient coroutine on a private loop."""

    def __init__(self, remote_name: str | None = None, config: ClientConfig | None = None,
                 project: str | None = None) -> None:
        self._runner = asyncio.Runner()
        self._async = self._runner.run(_connect(remote_name, config, project))

    def close(self) -> None:
        self._runner.run(self._async.close())
        self._runner.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._async, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._runner.run(_await(method(*args, **kwargs)))

        return call


async def _connect(remote_name: str | None, config: ClientConfig | None, project: str | None) -> AsyncClient:
    return AsyncClient.connect(remote_name, config, project)


async def _await(value: Awaitable[T]) -> T:
    return await value
