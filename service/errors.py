"""The errors synclock raises, one base class with stdlib-compatible subclasses."""

from __future__ import annotations


class SynclockError(Exception):
    """Base class of every error synclock raises on purpose."""


class ConfigError(SynclockError, ValueError):
    """A setting is missing or malformed; the message names the variable."""

    def __init__(self, variable: str, value: str, problem: str) -> None:
        super().__init__(f"{variable}={value!r}: {problem}")
        self.variable = variable


class BackendUnavailable(SynclockError, ConnectionError):
    """Redis or Postgres did not answer within its timeout."""

    def __init__(self, backend: str, detail: str) -> None:
        super().__init__(f"{backend} unavailable: {detail}")
        self.backend = backend
        self.detail = detail


class LeaseLost(SynclockError, RuntimeError):
    """The lease expired or was taken over while its holder still worked."""

    def __init__(self, name: str, fence: int) -> None:
        super().__init__(f"lease on {name!r} with fence {fence} is no longer held")
        self.name = name
        self.fence = fence


class FencedOut(SynclockError, RuntimeError):
    """A write carried a fencing token older than one Postgres already accepted."""

    def __init__(self, name: str, fence: int, accepted: int) -> None:
        super().__init__(f"fence {fence} on {name!r} is behind the accepted fence {accepted}")
        self.name = name
        self.fence = fence
        self.accepted = accepted
