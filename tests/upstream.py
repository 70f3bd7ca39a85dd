"""A local OpenRouter-style upstream whose behaviour each test scripts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

MODELS = {
    "data": [
        {
            "id": "openai/gpt-4o",
            "name": "OpenAI: GPT-4o",
            "context_length": 128000,
            "pricing": {
                "prompt": "0.0000025",
                "completion": "0.00001",
                "input_cache_read": "0.00000125",
            },
        },
        {"id": "meta/free-model", "pricing": {"prompt": "0", "completion": "0"}},
        {"id": "openrouter/auto", "pricing": {"prompt": "-1", "completion": "-1"}},
        {"id": "bad/negative", "pricing": {"prompt": "-0.5", "completion": "0"}},
        {"id": "bad/text", "pricing": {"prompt": "cheap", "completion": "0"}},
        {"id": "bad/float", "pricing": {"prompt": 1e-6, "completion": "0"}},
        {"id": "", "pricing": {"prompt": "0", "completion": "0"}},
        {"id": "openai/gpt-4o", "pricing": {"prompt": "1", "completion": "1"}},
    ]
}


class Upstream:
    """A local OpenRouter-style server whose behaviour each test scripts."""

    def __init__(self) -> None:
        self.replies: list[str] = []  # "ok", "500", "404", "garbage", "hang", "gate"
        self.default = "ok"
        self.calls = 0
        self.payload: Any = MODELS
        self.gate = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        mode = self.replies.pop(0) if self.replies else self.default
        if mode == "500":
            return web.Response(status=500, text="upstream broke")
        if mode == "404":
            return web.Response(status=404)
        if mode == "garbage":
            return web.Response(text="<html>not json", content_type="text/html")
        if mode == "hang":
            await asyncio.sleep(30)
        if mode == "gate":
            await self.gate.wait()
        return web.json_response(self.payload)


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, str]]:
    fake = Upstream()
    app = web.Application()
    app.router.add_get("/api/v1/models", fake.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield fake, str(server.make_url("/api/v1/models"))
    fake.gate.set()
    await server.close()
