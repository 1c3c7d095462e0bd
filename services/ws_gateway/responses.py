"""Plain HTTP answers the gateway gives during the opening handshake (health, metrics,
refusals), built as websockets ``Response`` objects."""

from __future__ import annotations

import http
from typing import Any

import orjson
from websockets.datastructures import Headers
from websockets.http11 import Response


def respond(
    status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None
) -> Response:
    status_obj = http.HTTPStatus(status)
    # A 204 has no content, and must not say how long it is (RFC 9110, 8.6).
    content = (
        []
        if status == 204
        else [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    )
    headers = Headers([*content, ("Cache-Control", "no-store"), ("Connection", "close")])
    for key, value in (extra or {}).items():
        headers[key] = value
    return Response(status_obj.value, status_obj.phrase, headers, body)


def json_response(status: int, payload: Any, extra: dict[str, str] | None = None) -> Response:
    return respond(status, orjson.dumps(payload), "application/json", extra)


def problem(status: int, detail: str, extra: dict[str, str] | None = None) -> Response:
    """An RFC 9457 problem, as the REST API answers."""
    title = http.HTTPStatus(status).phrase
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return respond(status, orjson.dumps(body), "application/problem+json", extra)
