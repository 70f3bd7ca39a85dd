"""OpenRouter-style ``GET /api/v1/models`` endpoints.

Prices there are decimal strings in USD per token: ``"0.0000025"`` is $2.50 per
million tokens, ``"0"`` is free (kept), ``"-1"`` means variable pricing and is
recorded as unknown. A model with any other malformed price is rejected, not guessed.
"""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal, InvalidOperation
from typing import Any, TypeGuard

import aiohttp

from service.records import PriceRecord
from service.sync.sources import Catalog, SourceError, dedupe

TOKENS_PER_MTOK = Decimal(1_000_000)
MAX_BODY_BYTES = 32 * 1024 * 1024
# Bounds that no real price crosses; beyond them Decimal and Postgres misbehave
# (a huge exponent was stored as 0, i.e. "free").
MAX_USD_PER_TOKEN = Decimal(1000)
MIN_EXPONENT = -30
_RETRY_STATUSES = {429, 500, 502, 503, 504}


class _Malformed(ValueError):
    pass


def usd_per_mtok(value: Any) -> Decimal | None:
    """USD-per-token string to USD per million tokens; -1 (variable) becomes None."""
    if value is None:
        return None
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise _Malformed(f"price {value!r} is not a decimal string")
    try:
        per_token = Decimal(str(value).strip())
    except (InvalidOperation, ArithmeticError) as exc:
        raise _Malformed(f"price {value!r} is not a decimal") from exc
    if not per_token.is_finite():
        raise _Malformed(f"price {value!r} is not finite")
    if per_token == -1:
        return None
    if per_token < 0:
        raise _Malformed(f"price {value!r} is negative")
    if per_token > MAX_USD_PER_TOKEN or (per_token and per_token.adjusted() < MIN_EXPONENT):
        raise _Malformed(f"price {str(value)[:40]!r} is out of range")
    return (per_token * TOKENS_PER_MTOK).normalize()


def _clean_text(value: Any) -> TypeGuard[str]:
    """A str that Postgres can store: no NUL, no lone surrogates."""
    if not isinstance(value, str) or "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_models(source: str, payload: Any) -> Catalog:
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise SourceError(f"{source}: response has no 'data' list")
    records: list[PriceRecord] = []
    rejected = 0
    for item in payload["data"]:
        try:
            records.append(_record(source, item))
        except _Malformed:
            rejected += 1
    return dedupe(records, rejected)


def _record(source: str, item: Any) -> PriceRecord:
    if not isinstance(item, dict):
        raise _Malformed("model entry is not an object")
    model_id = item.get("id")
    if not _clean_text(model_id) or not model_id.strip() or len(model_id) > 300:
        raise _Malformed(f"model id {str(model_id)[:40]!r} is invalid")
    pricing = item.get("pricing")
    if not isinstance(pricing, dict):
        raise _Malformed(f"model {model_id!r} has no pricing object")
    context = item.get("context_length")
    if context is not None and (
        isinstance(context, bool) or not isinstance(context, int) or context < 0
    ):
        context = None
    if isinstance(context, int) and context > 2**31 - 1:
        context = None
    name = item.get("name")
    return PriceRecord(
        provider=source,
        model_id=model_id.strip(),
        name=name[:500] if _clean_text(name) else None,
        input_usd_per_mtok=usd_per_mtok(pricing.get("prompt")),
        output_usd_per_mtok=usd_per_mtok(pricing.get("completion")),
        cached_input_usd_per_mtok=usd_per_mtok(pricing.get("input_cache_read")),
        context_window=context,
    )


class OpenRouterSource:
    """One endpoint; connect and read timeouts, bounded retries with backoff."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        timeout_s: float,
        retries: int,
        backoff_s: float = 0.2,
    ) -> None:
        self.name = name
        self.url = url
        self.timeout = aiohttp.ClientTimeout(
            total=timeout_s * 2, connect=timeout_s, sock_read=timeout_s
        )
        self.retries = retries
        self.backoff_s = backoff_s

    async def fetch(self) -> Catalog:
        last_error = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                payload = await self._get()
            except _Retryable as exc:
                last_error = str(exc)
                continue
            return parse_models(self.name, payload)
        raise SourceError(f"{self.name}: gave up after {self.retries + 1} attempts: {last_error}")

    async def _get(self) -> Any:
        headers = {"Accept": "application/json", "User-Agent": "synclock"}
        try:
            async with (
                aiohttp.ClientSession(timeout=self.timeout) as session,
                session.get(self.url, headers=headers) as response,
            ):
                if response.status in _RETRY_STATUSES:
                    raise _Retryable(f"HTTP {response.status}")
                if response.status != 200:
                    raise SourceError(f"{self.name}: HTTP {response.status}")
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > MAX_BODY_BYTES:
                        raise SourceError(f"{self.name}: body over {MAX_BODY_BYTES} B")
                    chunks.append(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as exc:
            raise SourceError(f"{self.name}: response is not usable JSON") from exc


class _Retryable(Exception):
    pass
