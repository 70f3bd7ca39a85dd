"""Plain records shared by the sources, the store and the job; no I/O here."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, TypedDict


class RunStatus(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"
    FENCED_OUT = "fenced_out"
    LOST_LEASE = "lost_lease"
    ABANDONED = "abandoned"
    INTERRUPTED = "interrupted"


class Trigger(enum.StrEnum):
    MANUAL = "manual"
    SCHEDULED = "scheduled"


@dataclass(frozen=True, slots=True)
class PriceRecord:
    """One model's prices in USD per million tokens; None means unknown."""

    provider: str
    model_id: str
    name: str | None
    input_usd_per_mtok: Decimal | None
    output_usd_per_mtok: Decimal | None
    cached_input_usd_per_mtok: Decimal | None
    context_window: int | None

    @property
    def key(self) -> tuple[str, str]:
        return (self.provider, self.model_id)


@dataclass(frozen=True, slots=True)
class PriceCounts:
    seen: int = 0
    added: int = 0
    changed: int = 0
    unchanged: int = 0
    deactivated: int = 0
    rejected: int = 0

    def __add__(self, other: PriceCounts) -> PriceCounts:
        return PriceCounts(
            seen=self.seen + other.seen,
            added=self.added + other.added,
            changed=self.changed + other.changed,
            unchanged=self.unchanged + other.unchanged,
            deactivated=self.deactivated + other.deactivated,
            rejected=self.rejected + other.rejected,
        )


class SourceResultJSON(TypedDict):
    source: str
    ok: bool
    seen: int
    added: int
    changed: int
    unchanged: int
    deactivated: int
    rejected: int
    error: str | None
    duration_s: float


@dataclass(frozen=True, slots=True)
class NewRun:
    id: str
    lock_name: str
    trigger: Trigger
    requested_by: str
    fence: int
    instance: str


@dataclass(frozen=True, slots=True)
class RunOutcome:
    status: RunStatus
    counts: PriceCounts
    error: str | None
    sources: list[SourceResultJSON] = field(default_factory=list)
    # When the run really ended; a record written later (Postgres was down)
    # still shows these, not the time of writing.
    finished_at: datetime | None = None
    duration_s: float | None = None


class RunJSON(TypedDict):
    id: str
    lock_name: str
    trigger: str
    requested_by: str
    fence: int
    instance: str
    status: str
    started_at: str
    finished_at: str | None
    duration_s: float | None
    counts: dict[str, int]
    error: str | None
    sources: list[Any]


@dataclass(frozen=True, slots=True)
class RunRecord:
    id: str
    lock_name: str
    trigger: str
    requested_by: str
    fence: int
    instance: str
    status: RunStatus
    started_at: datetime
    finished_at: datetime | None
    duration_s: float | None
    counts: PriceCounts
    error: str | None
    sources: list[Any]

    def to_json(self) -> RunJSON:
        c = self.counts
        return {
            "id": self.id,
            "lock_name": self.lock_name,
            "trigger": self.trigger,
            "requested_by": self.requested_by,
            "fence": self.fence,
            "instance": self.instance,
            "status": self.status.value,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "duration_s": self.duration_s,
            "counts": {
                "seen": c.seen,
                "added": c.added,
                "changed": c.changed,
                "unchanged": c.unchanged,
                "deactivated": c.deactivated,
                "rejected": c.rejected,
            },
            "error": self.error,
            "sources": self.sources,
        }

    @property
    def finished(self) -> bool:
        return self.status is not RunStatus.RUNNING
