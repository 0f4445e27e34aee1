from __future__ import annotations

import asyncio
from typing import Any

import pytest

from stapes.api.errors import BadRequest, Forbidden, NotFound
from stapes.api.status import StatusCode
from stapes.server.events import EventHub
from stapes.server.operations import Operation, OperationRegistry


async def test_operation_success_failure_and_events() -> None:
    hub = EventHub()
    listener = hub.subscribe(frozenset({"operation"}), None)
    registry = OperationRegistry(hub)

    async def ok(op: Operation) -> dict[str, Any]:
        op.update_metadata(progress={"percent": "50"})
        return {"answer": 42}

    async def broken(op: Operation) -> None:
        raise NotFound("thing is gone")

    good = registry.create(op_class="task", description="good", project="default")
    good.start(ok)
    bad = registry.create(op_class="task", description="bad", project="default")
    bad.start(broken)
    await asyncio.wait_for(asyncio.gather(good.done.wait(), bad.done.wait()), 5)
    assert good.status == StatusCode.SUCCESS and good.metadata["answer"] == 42
    assert bad.status == StatusCode.FAILURE and bad.err == "thing is gone"
    statuses = []
    while not listener.queue.empty():
        statuses.append(listener.queue.get_nowait()["metadata"]["status"])
    assert statuses.count("Success") == 1 and statuses.count("Failure") == 1
    with pytest.raises(BadRequest, match="already finished"):
        await good.cancel()


async def test_cancel_running_operation() -> None:
    registry = OperationRegistry(EventHub())

    async def forever(op: Operation) -> None:
        await asyncio.sleep(3600)

    op = registry.create(op_class="task", description="slow", project="default")
    op.start(forever)
    await asyncio.sleep(0)
    await op.cancel()
    await asyncio.wait_for(op.done.wait(), 5)
    assert op.status == StatusCode.CANCELLED


async def test_websocket_secrets_are_single_use() -> None:
    registry = OperationRegistry(EventHub())
    op = registry.create(op_class="websocket", description="ws", project="default", channels=("control", "fs"))
    assert set(op.secrets) == {"control", "fs"} and len(op.secrets["fs"]) == 64
    assert op.claim_channel(op.secrets["fs"]) == "fs"
    with pytest.raises(Forbidden):
        op.claim_channel("0" * 64)
    # A second connection with the same secret is refused at once, before the first one even attached.
    with pytest.raises(Forbidden, match="already used"):
        op.claim_channel(op.secrets["fs"])
    fake_ws: Any = object()
    attach = asyncio.create_task(op.attach("fs", fake_ws))
    assert await op.channel("fs", 1) is fake_ws
    op.release("fs")
    await asyncio.wait_for(attach, 1)


async def test_failed_upgrade_gives_the_secret_back() -> None:
    op = OperationRegistry(EventHub()).create(op_class="websocket", description="ws", project="default",
                                              channels=("control",))
    name = op.claim_channel(op.secrets["control"])
    op.unclaim_channel(name)
    assert op.claim_channel(op.secrets["control"]) == "control"


async def test_secret_of_a_finished_operation_is_refused() -> None:
    op = OperationRegistry(EventHub()).create(op_class="websocket", description="ws", project="default",
                                              channels=("control", "fs"))

    async def done(op: Any) -> None:
        return None

    op.start(done)
    await asyncio.wait_for(op.done.wait(), 5)
    with pytest.raises(Forbidden, match="finished"):
        op.claim_channel(op.secrets["control"])
