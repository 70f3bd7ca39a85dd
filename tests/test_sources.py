"""Price sources: unit conversion, the bundled catalog, and an OpenRouter-style
endpoint served by a local test server (healthy, flaky, failing, hanging)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from service.records import RunStatus
from service.sync.sources import SourceError
from service.sync.sources.genai import read_catalog
from service.sync.sources.openrouter import OpenRouterSource, parse_models, usd_per_mtok
from tests.upstream import MODELS, Upstream


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0.0000025", Decimal("2.5")),
        ("0.000000075", Decimal("0.075")),
        ("0", Decimal("0")),
        ("-1", None),
        (None, None),
        ("0.1", Decimal("100000")),
    ],
)
def test_usd_per_token_to_usd_per_million(raw: Any, expected: Decimal | None) -> None:
    assert usd_per_mtok(raw) == expected


def test_conversion_is_exact_decimal_not_float() -> None:
    # 0.0000001 * 1e6 in binary floating point is 0.09999999999999999
    assert usd_per_mtok("0.0000001") == Decimal("0.1")


def test_parse_keeps_free_marks_variable_unknown_rejects_malformed() -> None:
    catalog = parse_models("openrouter", MODELS)
    by_id = {r.model_id: r for r in catalog.records}

    assert set(by_id) == {"openai/gpt-4o", "meta/free-model", "openrouter/auto"}
    assert catalog.rejected == 5  # negative, text, float, empty id, duplicate
    gpt = by_id["openai/gpt-4o"]
    assert (gpt.provider, gpt.input_usd_per_mtok, gpt.output_usd_per_mtok) == (
        "openrouter",
        Decimal("2.5"),
        Decimal("10"),
    )
    assert gpt.cached_input_usd_per_mtok == Decimal("1.25")
    assert gpt.context_window == 128000
    assert by_id["meta/free-model"].input_usd_per_mtok == Decimal("0")
    assert by_id["openrouter/auto"].input_usd_per_mtok is None


@pytest.mark.parametrize("payload", [[], {"models": []}, {"data": "x"}, "nope"])
def test_response_without_data_list_is_a_source_error(payload: Any) -> None:
    with pytest.raises(SourceError, match="no 'data' list"):
        parse_models("or", payload)


def test_bundled_catalog_has_real_prices() -> None:
    catalog = read_catalog(datetime.now(UTC))
    providers = {r.provider for r in catalog.records}
    priced = [r for r in catalog.records if r.input_usd_per_mtok is not None]

    assert len(catalog.records) > 2_000
    assert len(providers) >= 40
    assert len(priced) > 1_500
    assert all(r.input_usd_per_mtok >= 0 for r in priced if r.input_usd_per_mtok is not None)
    assert len({r.key for r in catalog.records}) == len(catalog.records)


async def test_fetch_from_local_endpoint(upstream: tuple[Upstream, str]) -> None:
    fake, url = upstream
    catalog = await OpenRouterSource("or", url, timeout_s=2, retries=0).fetch()
    assert len(catalog.records) == 3
    assert fake.calls == 1


async def test_retries_transient_errors_then_succeeds(upstream: tuple[Upstream, str]) -> None:
    fake, url = upstream
    fake.replies = ["500", "500", "ok"]
    source = OpenRouterSource("or", url, timeout_s=2, retries=2, backoff_s=0.01)
    catalog = await source.fetch()
    assert len(catalog.records) == 3
    assert fake.calls == 3


async def test_gives_up_after_bounded_retries(upstream: tuple[Upstream, str]) -> None:
    fake, url = upstream
    fake.replies = ["500"] * 5
    source = OpenRouterSource("or", url, timeout_s=2, retries=2, backoff_s=0.01)
    with pytest.raises(SourceError, match="gave up after 3 attempts: HTTP 500"):
        await source.fetch()
    assert fake.calls == 3


@pytest.mark.parametrize(
    ("reply", "message"), [("404", "HTTP 404"), ("garbage", "not usable JSON")]
)
async def test_permanent_errors_are_not_retried(
    upstream: tuple[Upstream, str], reply: str, message: str
) -> None:
    fake, url = upstream
    fake.replies = [reply] * 3
    with pytest.raises(SourceError, match=message):
        await OpenRouterSource("or", url, timeout_s=2, retries=2, backoff_s=0.01).fetch()
    assert fake.calls == 1


async def test_read_timeout_is_bounded(upstream: tuple[Upstream, str]) -> None:
    fake, url = upstream
    fake.replies = ["hang", "hang"]
    started = asyncio.get_running_loop().time()
    with pytest.raises(SourceError, match="gave up"):
        await OpenRouterSource("or", url, timeout_s=0.2, retries=1, backoff_s=0.01).fetch()
    assert asyncio.get_running_loop().time() - started < 2


async def test_failing_source_makes_run_partial_and_leaves_its_models(
    upstream: tuple[Upstream, str],
    make_client: Any,
    auth: dict[str, str],
    database_url: str,
    schema: str,
) -> None:
    fake, url = upstream
    client = await make_client(
        SYNCLOCK_SOURCES=f"genai-prices,openrouter={url}", SYNCLOCK_SOURCE_RETRIES="0"
    )
    trigger = "/admin/pricing/scheduler/trigger?wait=30"

    first = await (await client.post(trigger, headers=auth)).json()
    fake.replies = ["500"]
    second = await (await client.post(trigger, headers=auth)).json()

    assert first["status"] == RunStatus.SUCCEEDED
    assert [s["seen"] for s in first["sources"]][1] == 3
    assert second["status"] == RunStatus.PARTIAL
    by_source = {s["source"]: s for s in second["sources"]}
    assert by_source["openrouter"]["ok"] is False
    assert "HTTP 500" in by_source["openrouter"]["error"]
    assert by_source["genai-prices"]["ok"] is True
    assert by_source["genai-prices"]["unchanged"] == by_source["genai-prices"]["seen"]
    conn = await asyncpg.connect(database_url)
    try:
        kept = await conn.fetch(
            f"SELECT * FROM \"{schema}\".model_prices WHERE source = 'openrouter' ORDER BY model_id"
        )
    finally:
        await conn.close()
    # The live source is listed last, so it owns the rows it shares with the
    # bundled catalog's "openrouter" provider; its failure leaves them as they were.
    assert [r["model_id"] for r in kept] == ["meta/free-model", "openai/gpt-4o", "openrouter/auto"]
    assert all(r["active"] and r["missing_runs"] == 0 for r in kept)
    assert {r["fence"] for r in kept} == {first["fence"]}
    assert kept[1]["input_usd_per_mtok"] == Decimal("2.5")
