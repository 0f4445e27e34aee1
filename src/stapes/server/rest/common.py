"""Response envelopes and request helpers shared by every handler."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from aiohttp import web

from stapes.api.errors import BadRequest, RequestTooLarge, StapesError
from stapes.api.requests import B, decode
from stapes.server.auth import Caller
from stapes.server.operations import Operation, Runner

if TYPE_CHECKING:
    from stapes.server.daemon import Daemon


def daemon(request: web.Request) -> Daemon:
    return cast("Daemon", request.app["daemon"])


def caller(request: web.Request) -> Caller:
    return cast(Caller, request["caller"])


def instance_url(name: str, project_name: str) -> str:
    suffix = "" if project_name == "default" else f"?project={project_name}"
    return f"/1.0/instances/{name}{suffix}"


def sync(metadata: Any = None, status: int = 200) -> web.Response:
    return web.json_response({
        "type": "sync", "status": "Success", "status_code": 200, "operation": "", "error_code": 0, "error": "",
        "metadata": metadata if metadata is not None else {},
    }, status=status)


def async_operation(op: Operation) -> web.Response:
    return web.json_response({
        "type": "async", "status": "Operation created", "status_code": 100, "operation": op.url,
        "error_code": 0, "error": "", "metadata": op.to_json(),
    }, status=202, headers={"Location": op.url})


async def _nothing(op: Operation) -> None:
    return None


def start_task(request: web.Request, description: str, project: str, work: Runner | None = None,
               instance: str | None = None) -> web.Response:
    """Run `work` as a task operation that cannot be cancelled (its steps roll back themselves) and answer
    202; without `work` the operation is already finished (Incus answers some synchronous changes so)."""
    if instance:  # an instance taking part in a migration refuses other changes at once
        daemon(request).instances.check_idle(project, instance)
    resources = {"instances": [instance_url(instance, project)]} if instance else {}
    op = daemon(request).operations.create(op_class="task", description=description, project=project,
                                           resources=resources, may_cancel=False)
    op.start(work or _nothing)
    return async_operation(op)


def error(err: StapesError) -> web.Response:
    return web.json_response({"type": "error", "error": err.message, "error_code": err.status, "metadata": None},
                             status=err.status)


UNTRUSTED_BODY_LIMIT = 16 * 1024  # an untrusted caller may only present a trust token
TRUSTED_BODY_LIMIT = 4 * 1024 * 1024  # JSON from a trusted caller: configs, devices, an exec command


async def raw_body(request: web.Request) -> bytes:
    """The body, bounded by who is calling: read no further than the limit, whatever the client claims."""
    limit = TRUSTED_BODY_LIMIT if caller(request).trusted else UNTRUSTED_BODY_LIMIT
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLarge(f"The request body is too large ({request.content_length} bytes; at most {limit} "
                              "here): send less, or upload images as a file")
    data = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        data += chunk
        if len(data) > limit:
            raise RequestTooLarge(f"The request body is too large (more than {limit} bytes): send less")
    return bytes(data)


async def body(request: web.Request, kind: type[B]) -> B:
    """The request body parsed once into its typed form (a 400 that names the field otherwise)."""
    return decode(await raw_body(request), kind)


def recursion(request: web.Request) -> int:
    try:
        return int(request.query.get("recursion", "0"))
    except ValueError:
        raise BadRequest("recursion must be 0, 1 or 2") from None


async def project(request: web.Request) -> str:
    name = request.query.get("project") or "default"
    await daemon(request).store.project(name)
    return name
