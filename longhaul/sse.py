"""Server-Sent Events, read as the HTML standard's EventSource reads them: lines into
events, each with its data and last event id. Pure: the client feeds it lines."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Message:
    data: str
    # The stream's last event id once this message is read (``id:`` carries on).
    last_event_id: str


class Parser:
    """Feed it one line at a time (without its line ending); a blank line completes a
    message, which ``feed`` returns. Comments (``:``) and unknown fields are dropped;
    a message without data is not dispatched, as EventSource does."""

    def __init__(self, last_event_id: str = "") -> None:
        self.last_event_id = last_event_id
        self.retry_ms: int | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> Message | None:
        if not line:
            data, self._data = self._data, []
            return Message("\n".join(data), self.last_event_id) if data else None
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
        return None
