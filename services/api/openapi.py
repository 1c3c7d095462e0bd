"""OpenAPI 3.1 of the ``/v1`` routes, generated from the same pydantic models that
validate the requests, so the document cannot drift from the code."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from shared.schemas import (
    TASK_TYPE_PATTERN,
    BatchRequest,
    Problem,
    Schedule,
    SchedulePage,
    ScheduleRequest,
    ScheduleUpdate,
    Task,
    TaskBatch,
    TaskPage,
    TaskRequest,
    TaskState,
    Timestamp,
    WsTokenRequest,
)


class WsToken(BaseModel):
    token: str
    expires_at: str
    task_id: str | None = None  # a task token's task


class DeadLetter(BaseModel):
    id: str
    task_id: str | None
    reason: str
    detail: str | None
    attempts: int | None
    last_error: dict[str, Any] | None
    created_at: str
    redriven_at: str | None


class DeadLetterPage(BaseModel):
    items: list[DeadLetter]
    next_cursor: str | None


class Redriven(DeadLetter):
    task: Task


class TaskTypeItem(BaseModel):
    name: str
    args_schema: dict[str, Any]
    # When a worker running the type last said so; null: none has.
    last_seen_at: Timestamp | None


class TaskTypeList(BaseModel):
    items: list[TaskTypeItem]


_MODELS: list[type[BaseModel]] = [
    TaskRequest,
    BatchRequest,
    Task,
    TaskPage,
    TaskBatch,
    Problem,
    WsToken,
    WsTokenRequest,
    TaskTypeList,
    DeadLetterPage,
    Redriven,
    ScheduleRequest,
    ScheduleUpdate,
    Schedule,
    SchedulePage,
]
_REF = "#/components/schemas/{model}"


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _content(model: type[BaseModel], media: str = "application/json") -> dict[str, Any]:
    return {"content": {media: {"schema": _ref(model)}}}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, **_content(Problem, "application/problem+json")}


def _retry_after() -> dict[str, Any]:
    return {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}


_COMMON = {
    "401": _problem("no or invalid API key"),
    "429": {**_problem("over the tenant's rate limit"), "headers": _retry_after()},
    # Any route: PostgreSQL (or what else it needs) unreachable or too slow. Before a
    # route's own 503 in its responses, which then says more.
    "503": {**_problem("a dependency down"), "headers": _retry_after()},
}
# Where a submitted task's id leads (lets clients and fuzzers follow the API).
_TASK_LINKS = {
    name: {"operationId": op, "parameters": {"id": "$response.body#/id"}}
    for name, op in (
        ("GetTask", "getTask"),
        ("CancelTask", "cancelTask"),
        ("RetryTask", "retryTask"),
    )
}
_TASK_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
}


_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "A repeat of the request under the same key answers 200 with the same"
    " task(s); another request, 422. Requests that would run the same are the same: key"
    " order, spelled-out defaults (the args schema's too) and the spelling of a number"
    " (1.0 is 1) do not count.",
    # Printable ASCII (as requests.idempotency_key checks), spaces only inside: HTTP
    # strips them from the ends.
    "schema": {
        "type": "string",
        "minLength": 1,
        "maxLength": 255,
        "pattern": "^[!-~]([ -~]*[!-~])?$",
    },
}


def _body_errors() -> dict[str, Any]:
    return {
        "400": _problem("body is not JSON (or not UTF-8, which JSON must be)"),
        "413": _problem("body over the limit"),
        "415": _problem("not application/json"),
        "422": _problem("validation failed"),
        "503": {
            **_problem(
                "back pressure (problem type `queue-full`; `delayed-full` when tasks with a"
                " delay would take the store of delayed tasks past its limit) or a dependency"
                " down (`broker-unavailable`, ...): not accepted"
            ),
            "headers": _retry_after(),
        },
    }


# Only the routes that store new tasks: their insert's answer can be lost.
_OUTCOME_UNKNOWN = {
    "504": {
        **_problem(
            "outcome unknown (`outcome-unknown`): the database connection broke while"
            " storing and the database could not be asked whether the tasks were stored."
            " They may have been accepted, and may run; a retry with the same"
            " Idempotency-Key is safe, one without may run them twice"
        ),
        "headers": _retry_after(),
    },
}


# Where a created schedule's id leads.
_SCHEDULE_LINKS = {
    name: {"operationId": op, "parameters": {"id": "$response.body#/id"}}
    for name, op in (
        ("GetSchedule", "getSchedule"),
        ("UpdateSchedule", "updateSchedule"),
        ("DeleteSchedule", "deleteSchedule"),
    )
}


def _schedule_body_errors() -> dict[str, Any]:
    return {
        "400": _problem("body is not JSON (or not UTF-8, which JSON must be)"),
        "413": _problem("body over the limit"),
        "415": _problem("not application/json"),
        "422": _problem(
            "validation failed: an invalid field, a cron expression that cannot be read or"
            " never fires, an unknown task type, or args the type's schema refuses"
        ),
    }


def _schedule_paths() -> dict[str, Any]:
    page_params = [
        {
            "name": "limit",
            "in": "query",
            "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
        },
        {"name": "cursor", "in": "query", "schema": {"type": "string"}},
    ]
    return {
        "/v1/schedules": {
            "post": {
                "operationId": "createSchedule",
                "summary": (
                    "Make a task of this type and args each time a cron expression fires"
                    " (UTC); a task per fire time at most, the fires missed while no worker"
                    " ran made up for by one task"
                ),
                "requestBody": {"required": True, **_content(ScheduleRequest)},
                "responses": {
                    "201": {
                        "description": "created",
                        "links": _SCHEDULE_LINKS,
                        **_content(Schedule),
                        "headers": {"Location": {"schema": {"type": "string"}}},
                    },
                    "409": _problem(
                        "the tenant has a schedule of this name (`schedule-exists`), or as"
                        " many schedules as LONGHAUL_MAX_SCHEDULES_PER_TENANT allows"
                        " (`schedule-limit`)"
                    ),
                    **_COMMON,
                    **_schedule_body_errors(),
                },
            },
            "get": {
                "operationId": "listSchedules",
                "summary": "List the tenant's schedules, newest first",
                "parameters": page_params,
                "responses": {
                    "200": {"description": "a page", **_content(SchedulePage)},
                    "422": _problem("invalid parameter, or one given more than once"),
                    **_COMMON,
                },
            },
        },
        "/v1/schedules/{id}": {
            "get": {
                "operationId": "getSchedule",
                "summary": "A schedule, with its next fire time and its last task",
                "parameters": [_TASK_ID],
                "responses": {
                    "200": {"description": "the schedule", **_content(Schedule)},
                    "404": _problem("no such schedule"),
                    **_COMMON,
                },
            },
            "patch": {
                "operationId": "updateSchedule",
                "summary": (
                    "Enable or disable a schedule, or change its cron expression or args;"
                    " the fields left out stay as they are"
                ),
                "parameters": [_TASK_ID],
                "requestBody": {"required": True, **_content(ScheduleUpdate)},
                "responses": {
                    "200": {"description": "the schedule as changed", **_content(Schedule)},
                    "404": _problem("no such schedule"),
                    **_COMMON,
                    **_schedule_body_errors(),
                },
            },
            "delete": {
                "operationId": "deleteSchedule",
                "summary": "Delete a schedule: it makes no more tasks (those it made go on)",
                "parameters": [_TASK_ID],
                "responses": {
                    "204": {"description": "deleted"},
                    "404": _problem("no such schedule"),
                    **_COMMON,
                },
            },
        },
    }


def build_openapi(server_url: str) -> dict[str, Any]:
    _, schemas = models_json_schema([(m, "validation") for m in _MODELS], ref_template=_REF)
    defs = schemas.get("$defs", {})
    paths: dict[str, Any] = {
        "/v1/tasks": {
            "post": {
                "operationId": "submitTask",
                "summary": "Submit a task",
                "parameters": [_IDEMPOTENCY_KEY],
                "requestBody": {"required": True, **_content(TaskRequest)},
                "responses": {
                    "202": {
                        "description": "accepted",
                        "links": _TASK_LINKS,
                        **_content(Task),
                        "headers": {"Location": {"schema": {"type": "string"}}},
                    },
                    "200": {
                        "description": "idempotent replay",
                        **_content(Task),
                        "headers": {
                            "Location": {"schema": {"type": "string"}},
                            "Idempotent-Replayed": {"schema": {"type": "string", "enum": ["true"]}},
                        },
                    },
                    "409": _problem(
                        "a concurrent request with this Idempotency-Key won, and its task"
                        " could not be read: retry the request"
                    ),
                    **_COMMON,
                    **_body_errors(),
                    **_OUTCOME_UNKNOWN,
                },
            },
            "get": {
                "operationId": "listTasks",
                "summary": "List the tenant's tasks, newest first",
                "parameters": [
                    {
                        "name": "state",
                        "in": "query",
                        "schema": {"type": "string", "enum": [s.value for s in TaskState]},
                    },
                    {
                        "name": "type",
                        "in": "query",
                        "schema": {
                            "type": "string",
                            "maxLength": 128,
                            "pattern": TASK_TYPE_PATTERN,
                        },
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
                    },
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "created_after",
                        "in": "query",
                        "description": (
                            "only tasks created at or after this instant (inclusive); RFC 3339"
                            " with a timezone, such as 2026-12-07T10:00:00Z"
                        ),
                        "schema": {"type": "string", "format": "date-time"},
                    },
                    {
                        "name": "created_before",
                        "in": "query",
                        "description": (
                            "only tasks created before this instant (exclusive); later than"
                            " created_after. A next page's request repeats the window with"
                            " its cursor"
                        ),
                        "schema": {"type": "string", "format": "date-time"},
                    },
                ],
                "responses": {
                    "200": {"description": "a page", **_content(TaskPage)},
                    "422": _problem(
                        "invalid parameter, one given more than once, or a time window that"
                        " ends where or before it starts"
                    ),
                    **_COMMON,
                },
            },
        },
        "/v1/tasks:batch": {
            "post": {
                "operationId": "submitTasks",
                "summary": "Submit 1..1000 tasks, all or none",
                "parameters": [_IDEMPOTENCY_KEY],
                "requestBody": {"required": True, **_content(BatchRequest)},
                "responses": {
                    "202": {"description": "accepted", **_content(TaskBatch)},
                    "200": {
                        "description": "idempotent replay: the tasks of the earlier batch",
                        **_content(TaskBatch),
                        "headers": {
                            "Idempotent-Replayed": {"schema": {"type": "string", "enum": ["true"]}},
                        },
                    },
                    "409": _problem(
                        "a concurrent request with this Idempotency-Key won and its tasks could"
                        " not be read, or some of them were deleted (task retention)"
                    ),
                    **_COMMON,
                    **_body_errors(),
                    **_OUTCOME_UNKNOWN,
                    "422": _problem(
                        "validation failed (`errors` names the items by index), the"
                        " Idempotency-Key was used with another body, or the batch can never"
                        " fit (`batch-too-large`: more tasks than LONGHAUL_MAX_QUEUE_DEPTH, or"
                        " more with a delay_s than LONGHAUL_MAX_DELAYED_TASKS): split it"
                    ),
                },
            },
        },
        "/v1/tasks/{id}": {
            "get": {
                "operationId": "getTask",
                "summary": "A task",
                "parameters": [_TASK_ID],
                "responses": {
                    "200": {"description": "the task", **_content(Task)},
                    "404": _problem("no such task"),
                    **_COMMON,
                },
            },
        },
        "/v1/tasks/{id}/cancel": {
            "post": {
                "operationId": "cancelTask",
                "summary": "Cancel a task",
                "parameters": [_TASK_ID],
                "responses": {
                    "202": {"description": "cancelled or cancelling", **_content(Task)},
                    "404": _problem("no such task"),
                    "409": _problem("already terminal"),
                    **_COMMON,
                },
            },
        },
        "/v1/tasks/{id}/retry": {
            "post": {
                "operationId": "retryTask",
                "summary": "Run a failed or cancelled task again",
                "parameters": [_TASK_ID],
                "responses": {
                    "202": {"description": "queued again", **_content(Task)},
                    "404": _problem("no such task"),
                    "409": _problem("not failed or cancelled"),
                    **_COMMON,
                    "503": {
                        **_problem("back pressure, or a dependency down"),
                        "headers": _retry_after(),
                    },
                },
            },
        },
        "/v1/dead-letters": {
            "get": {
                "operationId": "listDeadLetters",
                "summary": "Messages that could not be processed, with the reason",
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
                    },
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {"description": "a page", **_content(DeadLetterPage)},
                    "422": _problem("invalid parameter, or one given more than once"),
                    **_COMMON,
                },
            },
        },
        "/v1/dead-letters/{id}/redrive": {
            "post": {
                "operationId": "redriveDeadLetter",
                "summary": "Run a dead letter's task again, once",
                "parameters": [_TASK_ID],
                "responses": {
                    "202": {"description": "its task is queued again", **_content(Redriven)},
                    "404": _problem("no such dead letter"),
                    "409": _problem("already redriven, or nothing to run"),
                    **_COMMON,
                    "503": {
                        **_problem("back pressure, or a dependency down"),
                        "headers": _retry_after(),
                    },
                },
            },
        },
        "/v1/task-types": {
            "get": {
                "operationId": "listTaskTypes",
                "summary": "Task types the workers run",
                "responses": {"200": {"description": "types", **_content(TaskTypeList)}, **_COMMON},
            },
        },
        "/v1/ws-tokens": {
            "post": {
                "operationId": "createWsToken",
                "summary": (
                    "A short-lived, single-use token to open one WebSocket or SSE stream;"
                    " with a task_id, a task token: that task's SSE stream, reusable until"
                    " it expires or the API key asking for it is revoked. Revoking the key"
                    " also ends the streams its tokens opened, within the gateway's"
                    " LONGHAUL_REVOCATION_CHECK_S (a WebSocket closes with 1008)"
                ),
                "requestBody": {"required": False, **_content(WsTokenRequest)},
                "responses": {
                    "201": {"description": "the token", **_content(WsToken)},
                    "404": _problem("no such task (task_id)"),
                    **_COMMON,
                    **_body_errors(),
                    "503": {
                        **_problem("Redis or PostgreSQL unreachable"),
                        "headers": _retry_after(),
                    },
                },
            },
        },
    }
    paths.update(_schedule_paths())
    return {
        "openapi": "3.1.0",
        "info": {"title": "Longhaul API", "version": "1.0.0"},
        "servers": [{"url": server_url}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": defs,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
