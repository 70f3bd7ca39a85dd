"""Price sources. Each turns one upstream catalog into PriceRecords in USD per
million tokens, converting with Decimal and never with float."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from service.config import GENAI_PRICES, Settings
from service.errors import SynclockError
from service.records import PriceRecord


class SourceError(SynclockError, RuntimeError):
    """A source could not deliver its catalog; its models are left untouched."""


@dataclass(frozen=True, slots=True)
class Catalog:
    records: tuple[PriceRecord, ...]
    rejected: int


class Source(Protocol):
    name: str

    async def fetch(self) -> Catalog: ...


def dedupe(records: Iterable[PriceRecord], rejected: int = 0) -> Catalog:
    """Keep the first record per (provider, model id); later duplicates are rejected."""
    kept: dict[tuple[str, str], PriceRecord] = {}
    for record in records:
        if record.key in kept:
            rejected += 1
        else:
            kept[record.key] = record
    return Catalog(records=tuple(kept.values()), rejected=rejected)


def build_sources(settings: Settings) -> list[Source]:
    from service.sync.sources.genai import GenaiPricesSource
    from service.sync.sources.openrouter import OpenRouterSource

    sources: list[Source] = []
    for config in settings.sources:
        if config.kind == GENAI_PRICES:
            sources.append(GenaiPricesSource())
        else:
            sources.append(
                OpenRouterSource(
                    config.name,
                    config.url,
                    timeout_s=settings.source_timeout_s,
                    retries=settings.source_retries,
                )
            )
    return sources
