"""Response envelopes and request helpers shared by every handler."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web

from stapes.api.errors import BadRequest, StapesError
from stapes.server.auth import Caller
from stapes.server.operations import Operation

if TYPE_CHECKING:
    from stapes.server.daemon import Daemon


def daemon(request: web.Request) -> Daemon:
    return cast("Daemon", request.app["daemon"])


def caller(request: web.Request) -> Caller:
    return cast(Caller, request["caller"])


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
