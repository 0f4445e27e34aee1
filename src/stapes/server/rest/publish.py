"""`POST /1.0/images` with an instance or snapshot source (Incus's publish): checks, then an operation that
runs stapes.server.images.publish."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from stapes.api.errors import BadRequest
from stapes.api.names import validate_alias_name
from stapes.api.requests import ImagesPost
from stapes.server.images import publish
from stapes.server.images.store import image_fields
from stapes.server.operations import Operation
from stapes.server.rest.common import daemon, project, start_task

SOURCE_TYPES = ("instance", "container", "snapshot")


async def start(request: web.Request, data: ImagesPost) -> web.Response:
    d = daemon(request)
    proj = await project(request)
    assert data.source is not None
    kind, name = data.source.type, data.source.name
    instance, _ = publish.source_of(kind, name)
    await d.instances.get(proj, instance)  # a 404 now, not in the operation
    aliases = list(data.aliases or [])
    for alias in aliases:
        validate_alias_name(alias.name)
    existing = await d.store.aliases()
    taken = [a.name for a in aliases if a.name in existing]
    if taken:
        raise BadRequest(f"Aliases already exist: {', '.join(taken)} (delete them first)")
    properties = dict(data.properties or {})
    image_fields({"properties": properties})  # bounded and plain, as an imported image's
    public = data.public

    async def work(op: Operation) -> dict[str, Any]:
        row = await publish.publish(d, op, proj, kind, name, properties, public)
        for alias in aliases:
            await d.images.set_alias(alias.name, row.fingerprint, alias.description)
        return {"fingerprint": row.fingerprint, "size": row.size}

    return start_task(request, f"Publishing {name}", proj, work, instance=instance)
