"""The console client's detach keys (Ctrl+a q), as Incus's client reads them."""

from stapes.client.console import DetachFilter


def test_ctrl_a_q_detaches_and_nothing_after_it_is_sent() -> None:
    keys = DetachFilter()
    assert keys.feed(b"ls\r\x01") == b"ls\r" and not keys.detached
    assert keys.feed(b"qmore") == b"" and keys.detached


def test_ctrl_a_twice_sends_one_and_another_key_sends_both() -> None:
    keys = DetachFilter()
    assert keys.feed(b"\x01\x01") == b"\x01"
    assert keys.feed(b"\x01x") == b"\x01x" and not keys.detached
