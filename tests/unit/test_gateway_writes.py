"""services.ws_gateway.writes: the frames of one turn of the event loop, one write()."""

from __future__ import annotations

import asyncio
from typing import cast

from websockets.asyncio.connection import Connection
from websockets.protocol import State
from websockets.server import ServerProtocol

from services.ws_gateway.writes import CoalescedWrites


class Transport:
    """Records each write() the way the socket would see it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closing


class Ws:
    def __init__(self) -> None:
        self.protocol = ServerProtocol()
        self.protocol.state = State.OPEN  # past the handshake
        self.transport = Transport()


def _texts(data: bytes) -> list[str]:
    """The payloads of unmasked, unfragmented short text frames, as a client reads them."""
    texts = []
    while data:
        assert data[0] == 0x81  # FIN, text
        size = data[1]
        assert size < 126  # short frames only
        texts.append(data[2 : 2 + size].decode())
        data = data[2 + size :]
    return texts


async def test_frames_of_one_turn_leave_in_one_write_in_order() -> None:
    ws = Ws()
    writes = CoalescedWrites(cast(Connection, ws))
    for text in ("a", "b", "c"):
        writes.write(text)
    assert ws.transport.writes == []  # nothing before the turn ends
    await asyncio.sleep(0)
    assert len(ws.transport.writes) == 1
    assert _texts(ws.transport.writes[0]) == ["a", "b", "c"]
    writes.write("d")  # a later turn: a write of its own
    await asyncio.sleep(0)
    assert [_texts(w) for w in ws.transport.writes] == [["a", "b", "c"], ["d"]]


async def test_nothing_is_written_to_a_connection_that_is_gone() -> None:
    ws = Ws()
    writes = CoalescedWrites(cast(Connection, ws))
    writes.write("a")
    ws.transport.closing = True
    await asyncio.sleep(0)
    assert ws.transport.writes == []
