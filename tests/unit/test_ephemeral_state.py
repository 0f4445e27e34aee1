"""A look at a container's state that fails is no news: never "stopped" (the ephemeral watch deletes an
instance only when LXC positively says it stopped)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from stapes.api.status import StatusCode
from stapes.server import process
from stapes.server.instances.driver import InstanceSpec
from stapes.server.instances.lxc import LxcDriver


def _driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answers: dict[str, tuple[int, bytes]]
            ) -> tuple[LxcDriver, InstanceSpec, InstanceSpec]:
    driver = LxcDriver(tmp_path, "srv")
    defined = InstanceSpec("default", "c1", {}, {}, tmp_path / "v1")
    gone = InstanceSpec("default", "c2", {}, {}, tmp_path / "v2")
    (tmp_path / defined.runtime_name).mkdir()
    (tmp_path / defined.runtime_name / "config").write_text("")

    async def run(argv: Sequence[str], **kwargs: Any) -> process.Result:
        code, out = answers[argv[0]]
        return process.Result(argv, code, out, b"failed" if code else b"")

    monkeypatch.setattr(process, "run", run)
    return driver, defined, gone


@pytest.mark.parametrize("answer", [(1, b""), (0, b""), (0, b"NAME STATE\n")])
async def test_a_failed_or_empty_listing_is_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    answer: tuple[int, bytes]) -> None:
    driver, defined, gone = _driver(tmp_path, monkeypatch, {"lxc-ls": answer})
    states = await driver.states([defined, gone])
    assert states[defined.runtime_name].status == StatusCode.ERROR
    assert states[defined.runtime_name].error
    assert states[gone.runtime_name].status == StatusCode.STOPPED  # not defined at all: it cannot run


async def test_a_listing_says_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = InstanceSpec("default", "c1", {}, {}, tmp_path / "v1").runtime_name
    listing = f"NAME STATE\n{name} STOPPED\n".encode()
    driver, defined, _ = _driver(tmp_path, monkeypatch, {"lxc-ls": (0, listing)})
    assert (await driver.states([defined]))[defined.runtime_name].status == StatusCode.STOPPED


@pytest.mark.parametrize("answer", [(1, b""), (0, b""), (0, b"PID: 12\n")])
async def test_a_failed_or_empty_lxc_info_is_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     answer: tuple[int, bytes]) -> None:
    driver, defined, gone = _driver(tmp_path, monkeypatch, {"lxc-info": answer})
    state = await driver.state(defined, detail=False)
    assert state.status == StatusCode.ERROR and state.error
    assert (await driver.state(gone, detail=False)).status == StatusCode.STOPPED


async def test_lxc_info_says_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    driver, defined, _ = _driver(tmp_path, monkeypatch, {"lxc-info": (0, b"State: STOPPED\n")})
    assert (await driver.state(defined, detail=False)).status == StatusCode.STOPPED
