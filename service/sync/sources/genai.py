"""The LLM price catalog bundled with the genai-prices package (no network).

Its prices are already in USD per million tokens. Tiered prices are recorded at
their base tier; conditional prices are resolved for the moment of the sync.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal

from service.config import GENAI_PRICES
from service.records import PriceRecord
from service.sync.sources import Catalog, dedupe


def _usd_per_mtok(value: object) -> Decimal | None:
    base = getattr(value, "base", value)  # TieredPrices -> its base price
    if isinstance(base, Decimal) and base.is_finite() and base >= 0:
        return base
    return None


def read_catalog(at: datetime) -> Catalog:
    from genai_prices import data

    records: list[PriceRecord] = []
    rejected = 0
    for provider in data.providers:
        for model in provider.models:
            if not provider.id or not model.id:
                rejected += 1
                continue
            price = model.get_prices(at)
            records.append(
                PriceRecord(
                    provider=provider.id,
                    model_id=model.id,
                    name=model.name,
                    input_usd_per_mtok=_usd_per_mtok(getattr(price, "input_mtok", None)),
                    output_usd_per_mtok=_usd_per_mtok(getattr(price, "output_mtok", None)),
                    cached_input_usd_per_mtok=_usd_per_mtok(
                        getattr(price, "cache_read_mtok", None)
                    ),
                    context_window=model.context_window,
                )
            )
    return dedupe(records, rejected)


class GenaiPricesSource:
    name = GENAI_PRICES

    async def fetch(self) -> Catalog:
        # Resolving ~2,300 models is CPU work: keep it off the event loop so the
        # service keeps answering while a sync runs.
        return await asyncio.to_thread(read_catalog, datetime.now(UTC))
