"""State files sent while a checkpoint writes them (server/migration/growing.py), over a real websocket pair on
127.0.0.1, and the header fields that agree on it."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest

from stapes.api.errors import InternalError
from stapes.server.migration import growing, protocol
from stapes.server.streams import Channel

PAGES = re.compile(r"pages-[0-9]{1,9}\.img")


async def _write_slowly(directory: Path, parts: dict[str, list[bytes]]) -> None:
    """A checkpoint as CRIU writes its pages: files appear one after the other and grow in steps."""
    for name, chunks in parts.items():
        with (directory / name).open("wb") as file:
            for chunk in chunks:
                file.write(chunk)
                file.flush()
                await asyncio.sleep(0.01)
    (directory / "pagemap-1.img").write_bytes(b"not followed")


async def test_files_arrive_whole_while_they_grow(tmp_path: Path, channels: tuple[Channel, Channel]) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    target.mkdir()
    parts = {"pages-1.img": [os.urandom(3 << 20), os.urandom(5000), os.urandom(1 << 20)],
             "pages-2.img": [os.urandom(70000), b"", os.urandom(2 << 20)]}
    writer = asyncio.ensure_future(_write_slowly(source, parts))
    sent, received = await asyncio.gather(growing.send_growing(source, PAGES, writer, channels[0]),
                                          growing.receive_growing(target, PAGES, 0o644, channels[1]))
    assert sent == received == {name: sum(map(len, chunks)) for name, chunks in parts.items()}
    for name, chunks in parts.items():
        assert (target / name).read_bytes() == b"".join(chunks)
        assert (target / name).stat().st_mode & 0o7777 == 0o644  # as the driver declares (CRIU's own)
    assert sorted(os.listdir(target)) == ["pages-1.img", "pages-2.img"]  # the rest goes in the tar


@pytest.mark.parametrize("messages", [
    [b"\x0c../etc/x.img" + b"data"],  # a path
    [b"\x0dpagemap-1.img" + b"data"],  # a state file that is not written front to back
    [b""],  # no name at all
    [b"\x20pages-1.img"],  # a name longer than the message
    [b"\x0bpages-1.img" + b"data", b"\x0e../pages-1.img" + b"data"],  # a good file, then a path
])
async def test_names_the_target_refuses(tmp_path: Path, channels: tuple[Channel, Channel],
                                        messages: list[bytes]) -> None:
    for message in messages:
        await channels[0].send(message)
    with pytest.raises(InternalError, match="Protocol error"):
        await growing.receive_growing(tmp_path, PAGES, 0o644, channels[1])
    assert not (tmp_path.parent / "pages-1.img").exists() and not (tmp_path / "pagemap-1.img").exists()


async def test_the_target_keeps_a_file_it_did_not_create_apart(tmp_path: Path,
                                                               channels: tuple[Channel, Channel]) -> None:
    """A name already present (a symlink planted beside, say) is never written through."""
    (tmp_path / "outside").write_bytes(b"keep")
    (tmp_path / "pages-1.img").symlink_to(tmp_path / "outside")
    await channels[0].send(b"\x0bpages-1.img" + b"data")
    with pytest.raises(FileExistsError):
        await growing.receive_growing(tmp_path, PAGES, 0o644, channels[1])
    assert (tmp_path / "outside").read_bytes() == b"keep"


async def test_too_many_files(tmp_path: Path, channels: tuple[Channel, Channel], monkeypatch: pytest.MonkeyPatch
                              ) -> None:
    monkeypatch.setattr(growing, "MAX_FILES", 2)
    for n in range(3):
        await channels[0].send(f"\x0bpages-{n}.img".encode() + b"x")
    with pytest.raises(InternalError, match="more than 2"):
        await growing.receive_growing(tmp_path, PAGES, 0o644, channels[1])
    assert sorted(os.listdir(tmp_path)) == ["pages-0.img", "pages-1.img"]


def test_streaming_the_state_is_agreed_by_both() -> None:
    offer = protocol.offer_header(["tar-stream"], refresh=False, total_bytes=1, live=True, streamed_state=True)
    answer, _ = protocol.answer_header(offer, ["tar-stream"], streamed_state=True)
    assert protocol.state_streamed(offer, answer)
    # A receiver whose driver cannot (or an older Stapes that does not know the field) leaves it unset.
    refused, _ = protocol.answer_header(offer, ["tar-stream"], streamed_state=False)
    assert not refused.stapesStreamedState and not protocol.state_streamed(offer, refused)
    # Lazy pages send no memory in the checkpoint: nothing to stream.
    lazy = protocol.offer_header(["tar-stream"], refresh=False, total_bytes=1, live=True, lazy=True,
                                 streamed_state=True)
    assert not lazy.stapesStreamedState
    unasked = protocol.offer_header(["tar-stream"], refresh=False, total_bytes=1, live=True)
    assert not protocol.answer_header(unasked, ["tar-stream"], streamed_state=True)[0].stapesStreamedState
