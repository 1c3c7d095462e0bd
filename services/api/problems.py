"""RFC 9457 problem responses, and the middleware that turns every error into one."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from shared.logging import request_id_var
from shared.schemas import Problem, ProblemError, summary

log = logging.getLogger(__name__)

PROBLEM_TYPE = "application/problem+json"
TYPE_BASE = "https://longhaul.dev/problems/"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ProblemException(Exception):
    """Raised by handlers; the middleware renders it. ``slug`` names the problem type."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        *,
        slug: str | None = None,
        errors: Sequence[ProblemError] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail or title)
        self.problem = Problem(
            type=TYPE_BASE + slug if slug else "about:blank",
            title=title,
            status=status,
            detail=detail,
            errors=list(errors) if errors is not None else None,
        )
        self.headers = dict(headers or {})


def problem_response(problem: Problem, headers: Mapping[str, str] | None = None) -> web.Response:
    body = problem.model_dump(exclude_none=True)
    if (rid := request_id_var.get()) is not None:
        body["request_id"] = rid
    return web.Response(
        status=problem.status,
        body=orjson.dumps(body),
        content_type=PROBLEM_TYPE,
        headers=headers,
    )


# pydantic says a value of the wrong JSON kind should be "a valid dictionary or instance
# of TaskRequest": a class of ours. The client sent JSON, so say which JSON.
_KINDS = {"model_type": "a JSON object", "dict_type": "a JSON object", "list_type": "a JSON array"}


def _message(error: ErrorDetails) -> str:
    kind = _KINDS.get(error["type"])
    if kind is None:
        return error["msg"]
    return f"must be {kind}" if error["loc"] else f"the body must be {kind}"


def validation_problem(
    exc: ValidationError, prefix: Sequence[str | int] = ("body",), title: str = "Invalid request"
) -> ProblemException:
    errors = [ProblemError(loc=[*prefix, *e["loc"]], msg=_message(e)) for e in exc.errors()]
    return ProblemException(422, title, summary(errors, prefix), slug="validation", errors=errors)


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ProblemException as exc:
        return problem_response(exc.problem, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own refusals (404 route, 405 method, 413 body): same shape as ours.
        headers = {k: v for k, v in exc.headers.items() if k.lower() in {"allow", "retry-after"}}
        return problem_response(
            Problem(title=exc.reason, status=exc.status, detail=_detail(exc, request)), headers
        )
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        return problem_response(
            Problem(
                title="Internal Server Error",
                status=500,
                detail="an unexpected error; it has been logged under this request_id",
            )
        )


def _detail(exc: web.HTTPException, request: web.Request) -> str:
    """aiohttp's own text when it says more than the status line, else ours: every
    problem has a detail."""
    text: Any = exc.text
    if isinstance(text, str) and text and not text.startswith(f"{exc.status}:"):
        return text
    if exc.status == 404:
        return f"no route for {request.path}"
    if exc.status == 405:
        return f"{request.method} is not allowed here; allowed: {exc.headers.get('Allow', '')}"
    return str(exc.reason)
