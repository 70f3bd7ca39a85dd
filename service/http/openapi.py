"""The API's OpenAPI 3.1 document, served at ``/openapi.json``.

A test compares its paths and methods with the routes the app registers, and
schemathesis checks live responses against it.
"""

from __future__ import annotations

from typing import Any

from service import __version__
from service.records import RunStatus

PROBLEM = "application/problem+json"

_problem_schema: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
    },
}

_holder_schema: dict[str, Any] = {
    "type": "object",
    "required": ["owner", "run_id", "fence", "lease_remaining_ms"],
    "properties": {
        "owner": {"type": "string"},
        "run_id": {"type": ["string", "null"]},
        "fence": {"type": "integer"},
        "lease_remaining_ms": {"type": "integer"},
    },
}

_run_schema: dict[str, Any] = {
    "type": "object",
    "required": ["id", "status", "fence", "trigger", "started_at", "counts", "sources"],
    "properties": {
        "id": {"type": "string", "format": "uuid"},
        "lock_name": {"type": "string"},
        "trigger": {"type": "string", "enum": ["manual", "scheduled"]},
        "requested_by": {"type": "string"},
        "fence": {"type": "integer"},
        "instance": {"type": "string"},
        "status": {"type": "string", "enum": [s.value for s in RunStatus]},
        "started_at": {"type": "string"},
        "finished_at": {"type": ["string", "null"]},
        "duration_s": {"type": ["number", "null"]},
        "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
        "error": {"type": ["string", "null"]},
        "sources": {"type": "array"},
    },
}


def _problem(description: str, *statuses: int) -> dict[str, Any]:
    return {
        str(status): {
            "description": description,
            "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for status in statuses
    }


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ADMIN_ERRORS = {
    **_problem("missing or wrong admin token", 401),
    **_problem("Redis or Postgres unavailable", 503),
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "synclock", "version": __version__},
    "components": {
        "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}},
        "schemas": {"Problem": _problem_schema, "Holder": _holder_schema, "Run": _run_schema},
    },
    "paths": {
        "/admin/pricing/scheduler/trigger": {
            "post": {
                "summary": "Start a pricing sync, or learn who runs one",
                "security": [{"admin": []}],
                "parameters": [
                    {
                        "name": "wait",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "pattern": "^[0-9]{1,6}(\\.[0-9]{1,6})?$"},
                        "description": "seconds to wait for the run to finish, in plain"
                        " decimal, at most SYNCLOCK_MAX_WAIT (60 by default); empty means 0",
                    }
                ],
                "responses": {
                    "200": _json(
                        "the run finished within wait", {"$ref": "#/components/schemas/Run"}
                    ),
                    "202": _json(
                        "the run started",
                        {
                            "type": "object",
                            "required": ["run_id", "status", "fence", "location"],
                            "properties": {
                                "run_id": {"type": "string", "format": "uuid"},
                                "status": {"type": "string"},
                                "fence": {"type": "integer"},
                                "lease_remaining_ms": {"type": "integer"},
                                "location": {"type": "string"},
                            },
                        },
                    ),
                    **_problem("invalid wait", 400),
                    **_problem("a sync already holds the lock", 429),
                    **_ADMIN_ERRORS,
                },
            }
        },
        "/admin/pricing/sync/runs": {
            "get": {
                "summary": "Recent runs, newest first",
                "security": [{"admin": []}],
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 100},
                    },
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"type": "string", "enum": [s.value for s in RunStatus]},
                    },
                ],
                "responses": {
                    "200": _json(
                        "runs",
                        {
                            "type": "object",
                            "required": ["runs"],
                            "properties": {
                                "runs": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/Run"},
                                }
                            },
                        },
                    ),
                    **_problem("invalid limit or status", 400),
                    **_ADMIN_ERRORS,
                },
            }
        },
        "/admin/pricing/sync/runs/{run_id}": {
            "get": {
                "summary": "One run",
                "security": [{"admin": []}],
                "parameters": [
                    {
                        "name": "run_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "format": "uuid"},
                    }
                ],
                "responses": {
                    "200": _json("the run", {"$ref": "#/components/schemas/Run"}),
                    **_problem("run id is not a UUID", 400),
                    **_problem("no such run", 404),
                    **_ADMIN_ERRORS,
                },
            }
        },
        "/admin/pricing/scheduler/status": {
            "get": {
                "summary": "Lock holder, running run, last success, next scheduled run",
                "security": [{"admin": []}],
                "responses": {
                    "200": _json(
                        "status",
                        {
                            "type": "object",
                            "required": ["lock", "running_run", "last_success_at", "scheduler"],
                            "properties": {
                                "instance": {"type": "string"},
                                "lock": {"type": "object"},
                                "running_run": {
                                    "oneOf": [
                                        {"$ref": "#/components/schemas/Run"},
                                        {"type": "null"},
                                    ]
                                },
                                "last_success_at": {"type": ["string", "null"]},
                                "scheduler": {"type": "object"},
                                "now": {"type": "string"},
                            },
                        },
                    ),
                    **_ADMIN_ERRORS,
                },
            }
        },
        "/admin/pricing/sync/lock": {
            "delete": {
                "summary": "Force-release the lock (the fence keeps this safe)",
                "security": [{"admin": []}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["reason"],
                                "properties": {
                                    "reason": {
                                        "type": "string",
                                        "minLength": 1,
                                        "maxLength": 500,
                                        "description": "printable text; control and"
                                        " unassigned characters are refused (422)",
                                    }
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(
                        "released, or nothing to release",
                        {
                            "type": "object",
                            "required": ["released", "holder", "reason"],
                            "properties": {
                                "released": {"type": "boolean"},
                                "holder": {
                                    "oneOf": [
                                        {"$ref": "#/components/schemas/Holder"},
                                        {"type": "null"},
                                    ]
                                },
                                "reason": {"type": "string"},
                            },
                        },
                    ),
                    **_problem("malformed JSON", 400),
                    **_problem("body too large", 413),
                    **_problem("body is not JSON", 415),
                    **_problem("reason missing or invalid", 422),
                    **_ADMIN_ERRORS,
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Process is up (never touches Redis or Postgres)",
                "responses": {"200": _json("up", {"type": "object"})},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Redis and Postgres reachable",
                "responses": {
                    "200": _json("ready", {"type": "object"}),
                    "503": _json("not ready, or shutting down", {"type": "object"}),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus exposition",
                "responses": {"200": {"description": "text exposition format"}},
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": _json("OpenAPI 3.1", {"type": "object"})},
            }
        },
    },
}
