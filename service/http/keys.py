"""Typed application keys."""

from __future__ import annotations

import asyncio

from aiohttp import web

from service.http.auth import AdminTokens
from service.runtime import Runtime

RUNTIME = web.AppKey("runtime", Runtime)
TOKENS = web.AppKey("tokens", AdminTokens)
BACKGROUND = web.AppKey("background", list[asyncio.Task[None]])
