"""RFC 9457 problem documents (``application/problem+json``)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

CONTENT_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:synclock:problem:"


class Problem(Exception):
    """Raised by handlers; rendered with its status, type and extension members."""

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        self.status = status
        self.headers = headers or {}
        self.body = {
            "type": TYPE_PREFIX + slug,
            "title": title,
            "status": status,
            "detail": detail,
            **extensions,
        }
        super().__init__(f"{status} {slug}: {detail}")

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            text=json.dumps(self.body),
            content_type=CONTENT_TYPE,
            headers=self.headers,
        )


def invalid(detail: str, *, parameter: str) -> Problem:
    return Problem(400, "invalid-parameter", "Invalid parameter", detail, parameter=parameter)


def unauthorized() -> Problem:
    return Problem(
        401,
        "unauthorized",
        "Missing or wrong admin token",
        "send 'Authorization: Bearer <admin token>'",
        headers={"WWW-Authenticate": 'Bearer realm="synclock"'},
    )


def unavailable(backend: str, detail: str) -> Problem:
    return Problem(
        503,
        "backend-unavailable",
        f"{backend} is unavailable",
        detail,
        headers={"Retry-After": "1"},
        backend=backend,
    )


def from_http_error(exc: web.HTTPException) -> web.Response:
    """Turn aiohttp's own errors (404, 405, 413, ...) into problem documents."""
    slug = exc.reason.lower().replace(" ", "-") if exc.reason else "error"
    body = {
        "type": TYPE_PREFIX + slug,
        "title": exc.reason,
        "status": exc.status,
        "detail": exc.text
        if exc.text and exc.text != f"{exc.status}: {exc.reason}"
        else exc.reason,
    }
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow",)}
    return web.Response(
        status=exc.status,
        text=json.dumps(body),
        content_type=CONTENT_TYPE,
        headers=headers,
    )
