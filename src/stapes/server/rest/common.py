"""Response envelopes and request helpers shared by every handler."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web

from stapes.api.errors import BadRequest, StapesError
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
    resources = {"instances": [instance_url(instance, project)]} if instance else {}
    op = daemon(request).operations.create(op_class="task", description=description, project=project,
                                           resources=resources, may_cancel=False)
    op.start(work or _nothing)
    return async_operation(op)


def error(err: StapesError) -> web.Response:
    return web.json_response({"type": "error", "error": err.message, "error_code": err.status, "metadata": None},
                             status=err.status)


async def body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(f"The request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object")
    return data


def recursion(request: web.Request) -> int:
    try:
        return int(request.query.get("recursion", "0"))
    except ValueError:
        raise BadRequest("recursion must be 0, 1 or 2") from None


async def project(request: web.Request) -> str:
    name = request.query.get("project") or "default"
    await daemon(request).store.project(name)
    return name


def string_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be an object of strings")
    for key, item in value.items():
        if not isinstance(item, str):
            raise BadRequest(f"{what}: the value of {key!r} must be a string, got {json.dumps(item)}")
    return {str(k): v for k, v in value.items()}


def devices_map(value: Any) -> dict[str, dict[str, str]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest("devices must be an object of device objects")
    return {str(name): string_map(dev, f"device {name!r}") for name, dev in value.items()}
