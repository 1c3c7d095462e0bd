"""The test helpers that other tests rely on to be what they say."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from tests import support


class _Socket:
    """A socket whose bind(port 0) gets the next port of a fixed list."""

    offered: list[int] = []

    def __enter__(self) -> _Socket:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def bind(self, _address: Any) -> None:
        self.port = self.offered.pop(0)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


def test_free_port_never_hands_out_a_port_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel may offer a port it just offered: the second offer is passed over."""
    monkeypatch.setattr(support, "_HANDED_OUT", set())
    monkeypatch.setattr(_Socket, "offered", [40001, 40001, 40002, 40001, 40002, 40003])
    monkeypatch.setattr(socket, "socket", _Socket)
    assert [support.free_port() for _ in range(3)] == [40001, 40002, 40003]
