"""The aiohttp application: authentication and error middleware, and every resource's routes."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from stapes.api.errors import Forbidden, InternalError, NotFound, StapesError
from stapes.api.redact import redact
from stapes.server.auth import identify
from stapes.server.rest import (
    backups,
    certificates,
    console,
    files,
    images,
    instances,
    networks,
    operations,
    profiles,
    projects,
    root,
    storage,
    volumes,
)
from stapes.server.rest.common import error

if TYPE_CHECKING:
    from stapes.server.daemon import Daemon

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# What an untrusted client may reach: server info, adding itself with a token, and websockets by secret.
_UNTRUSTED_ALLOWED = [
    ("GET", re.compile(r"^/(1\.0/?)?$")),
    ("POST", re.compile(r"^/1\.0/certificates/?$")),
    ("GET", re.compile(r"^/1\.0/operations/[^/]+/websocket$")),
]


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    who = identify(request, request.app["daemon"].trust)
    request["caller"] = who
    if not who.trusted and not any(m == request.method and p.match(request.path) for m, p in _UNTRUSTED_ALLOWED):
        return error(Forbidden("Not authorized: this client is not trusted by the server; add it with a trust "
                               "token ('stapes remote add NAME URL --token TOKEN')"))
    return await handler(request)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except StapesError as err:
        return error(err)
    except web.HTTPNotFound:
        return error(NotFound(f"No such API endpoint: {request.method} {request.path}"))
    except web.HTTPMethodNotAllowed:
        return error(StapesError(f"Method {request.method} not allowed on {request.path}"))
    except web.HTTPException:
        raise
    except Exception as err:
        log.exception("%s %s failed", request.method, request.path)
        return error(InternalError(redact(f"Internal error: {err}")))  # aiohttp's errors carry URLs, secrets


def build_app(daemon: Daemon) -> web.Application:
    app = web.Application(middlewares=[error_middleware, auth_middleware], client_max_size=1 << 40)
    app["daemon"] = daemon
    table = web.RouteTableDef()
    for module in (root, instances, backups, operations, images, storage, profiles, projects, certificates, networks,
                   volumes, files, console):
        module.routes(table)
    app.add_routes(table)
    return app
