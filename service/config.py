"""Settings read from ``SYNCLOCK_*`` environment variables, validated once at start."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

from service import redis_urls
from service.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SECRET_PARAM = re.compile(r"pass|secret|token|key", re.IGNORECASE)
_SOURCE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

GENAI_PRICES = "genai-prices"


def parse_duration_s(variable: str, value: str, *, low_s: float, high_s: float) -> float:
    """``500ms``, ``30s``, ``5m``, ``6h``, ``1d``; a bare number means seconds."""
    match = _DURATION.match(value)
    if match is None:
        raise ConfigError(variable, value, "expected a duration such as 500ms, 30s, 6h")
    seconds = float(match.group(1)) * _UNIT_S[match.group(2) or "s"]
    if not low_s <= seconds <= high_s:
        raise ConfigError(variable, value, f"must be between {_show(low_s)} and {_show(high_s)}")
    return seconds


def _show(seconds: float) -> str:
    for unit in ("d", "h", "m", "s"):
        if seconds >= _UNIT_S[unit] and seconds % _UNIT_S[unit] == 0:
            return f"{int(seconds // _UNIT_S[unit])}{unit}"
    return f"{round(seconds * 1000)}ms"


@dataclass(frozen=True, slots=True)
class SourceConfig:
    """One price source: the bundled catalog, or an OpenRouter-style endpoint."""

    name: str
    kind: str  # "genai-prices" or "openrouter"
    url: str = ""


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str | None
    redis_prefix: str
    redis_timeout_s: float
    database_url: str | None
    database_schema: str
    database_timeout_s: float
    admin_tokens: tuple[str, ...]
    admin_tokens_file: Path | None
    lock_name: str
    lock_ttl_s: float
    max_lock_ttl_s: float
    sync_interval_s: float
    scheduler: bool
    max_wait_s: float
    sources: tuple[SourceConfig, ...]
    source_timeout_s: float
    source_retries: int
    data_dir: Path
    instance: str
    log_level: str
    log_format: str
    shutdown_timeout_s: float

    @property
    def lock_ttl_ms(self) -> int:
        return round(self.lock_ttl_s * 1000)

    @property
    def embedded(self) -> bool:
        return self.redis_url is None or self.database_url is None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env

        def get(name: str, default: str) -> str:
            return env.get(name, "").strip() or default

        def duration(name: str, default: str, low_s: float, high_s: float) -> float:
            return parse_duration_s(name, get(name, default), low_s=low_s, high_s=high_s)

        lock_ttl_s = duration("SYNCLOCK_LOCK_TTL", "30s", 0.1, 3600)
        max_lock_ttl_s = duration("SYNCLOCK_MAX_LOCK_TTL", "10m", 0.1, 86400)
        if lock_ttl_s > max_lock_ttl_s:
            raise ConfigError(
                "SYNCLOCK_LOCK_TTL",
                get("SYNCLOCK_LOCK_TTL", "30s"),
                f"cannot exceed SYNCLOCK_MAX_LOCK_TTL ({_show(max_lock_ttl_s)})",
            )
        tokens_file = get("SYNCLOCK_ADMIN_TOKENS_FILE", "")
        return cls(
            redis_url=_url("SYNCLOCK_REDIS_URL", get("SYNCLOCK_REDIS_URL", ""), _REDIS),
            redis_prefix=_prefix(get("SYNCLOCK_REDIS_PREFIX", "synclock:")),
            redis_timeout_s=duration("SYNCLOCK_REDIS_TIMEOUT", "500ms", 0.01, 60),
            database_url=_url("SYNCLOCK_DATABASE_URL", get("SYNCLOCK_DATABASE_URL", ""), _POSTGRES),
            database_schema=_schema(get("SYNCLOCK_DATABASE_SCHEMA", "synclock")),
            database_timeout_s=duration("SYNCLOCK_DATABASE_TIMEOUT", "5s", 0.05, 300),
            admin_tokens=_tokens(get("SYNCLOCK_ADMIN_TOKENS", "")),
            admin_tokens_file=Path(tokens_file) if tokens_file else None,
            lock_name=get("SYNCLOCK_LOCK_NAME", "pricing-sync"),
            lock_ttl_s=lock_ttl_s,
            max_lock_ttl_s=max_lock_ttl_s,
            sync_interval_s=duration("SYNCLOCK_SYNC_INTERVAL", "6h", 1, 30 * 86400),
            scheduler=_switch("SYNCLOCK_SCHEDULER", get("SYNCLOCK_SCHEDULER", "on")),
            max_wait_s=duration("SYNCLOCK_MAX_WAIT", "60s", 0, 3600),
            sources=_sources(get("SYNCLOCK_SOURCES", GENAI_PRICES)),
            source_timeout_s=duration("SYNCLOCK_SOURCE_TIMEOUT", "10s", 0.05, 300),
            source_retries=_count(
                "SYNCLOCK_SOURCE_RETRIES", get("SYNCLOCK_SOURCE_RETRIES", "2"), 10
            ),
            data_dir=Path(get("SYNCLOCK_DATA_DIR", ".synclock")),
            instance=get("SYNCLOCK_INSTANCE", f"{socket.gethostname()}-{os.getpid()}"),
            log_level=_choice(
                "SYNCLOCK_LOG_LEVEL",
                get("SYNCLOCK_LOG_LEVEL", "info"),
                ("debug", "info", "warning", "error"),
            ),
            log_format=_choice(
                "SYNCLOCK_LOG_FORMAT",
                get("SYNCLOCK_LOG_FORMAT", "auto"),
                ("auto", "json", "console"),
            ),
            shutdown_timeout_s=duration("SYNCLOCK_SHUTDOWN_TIMEOUT", "20s", 0, 600),
        )


_REDIS = redis_urls.SCHEMES
_POSTGRES = ("postgres", "postgresql")


def _url(variable: str, value: str, schemes: tuple[str, ...]) -> str | None:
    if not value:
        return None
    if value.partition("://")[0] not in schemes:
        raise ConfigError(
            variable, redact_url(value), f"must start with one of {', '.join(schemes)}://"
        )
    if value.startswith(("redis+sentinel://", "redis+cluster://")):
        try:
            redis_urls.parse(value)
        except ValueError as exc:
            raise ConfigError(variable, redact_url(value), str(exc)) from None
        return value
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - parses the port, raising on nonsense
    except ValueError as exc:
        raise ConfigError(variable, "<redacted>", f"not a valid URL: {exc}") from None
    if parts.scheme not in schemes:
        shown = redact_url(value)
        raise ConfigError(variable, shown, f"scheme must be one of {', '.join(schemes)}")
    return value


def redact_url(url: str) -> str:
    """The URL with any password replaced, safe for logs and error messages:
    the user-info password and secret-looking query parameters alike."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        # Split at the last "@" as the Redis URL parser does: a password may hold
        # "/", "#" or "?", which would hide it from urlsplit.
        userinfo, _, hosts = rest.rpartition("@")
        if ":" in userinfo:
            url = f"{scheme}://{userinfo.partition(':')[0]}:***@{hosts}"
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.query:
        query = [
            (key, "***" if _SECRET_PARAM.search(key) else value)
            for key, value in parse_qsl(parts.query, keep_blank_values=True)
        ]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return parts.geturl()


def _prefix(value: str) -> str:
    if "{" in value or "}" in value:
        raise ConfigError("SYNCLOCK_REDIS_PREFIX", value, "cannot contain braces")
    return value


def _schema(value: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", value):
        raise ConfigError("SYNCLOCK_DATABASE_SCHEMA", value, "must be a lower-case SQL identifier")
    return value


def _tokens(value: str) -> tuple[str, ...]:
    tokens = tuple(t.strip() for t in value.split(",") if t.strip())
    for token in tokens:
        if len(token) < 16:
            # The value is a secret: name the variable, never echo the token.
            raise ConfigError(
                "SYNCLOCK_ADMIN_TOKENS", "<redacted>", "each token needs 16+ characters"
            )
    return tokens


def _switch(variable: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("on", "true", "1", "yes"):
        return True
    if lowered in ("off", "false", "0", "no"):
        return False
    raise ConfigError(variable, value, "expected on or off")


def _choice(variable: str, value: str, choices: tuple[str, ...]) -> str:
    if value.lower() not in choices:
        raise ConfigError(variable, value, f"expected one of {', '.join(choices)}")
    return value.lower()


def _count(variable: str, value: str, high: int) -> int:
    if not re.fullmatch(r"[0-9]{1,6}", value) or int(value) > high:
        raise ConfigError(variable, value, f"expected a whole number from 0 to {high}")
    return int(value)


def _sources(value: str) -> tuple[SourceConfig, ...]:
    """``genai-prices`` and/or ``name=https://host/api/v1/models``, comma-separated."""
    sources: list[SourceConfig] = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        if item == GENAI_PRICES:
            sources.append(SourceConfig(name=GENAI_PRICES, kind=GENAI_PRICES))
            continue
        name, sep, url = item.partition("=")
        name = name.strip()
        url = url.strip()
        if not sep or not _SOURCE_NAME.match(name):
            raise ConfigError("SYNCLOCK_SOURCES", item, "expected genai-prices or name=https://...")
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - parses the port, raising on nonsense
        except ValueError:
            raise ConfigError("SYNCLOCK_SOURCES", item, "not a valid URL") from None
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError("SYNCLOCK_SOURCES", item, "the URL must be http(s)")
        sources.append(SourceConfig(name=name, kind="openrouter", url=url))
    names = [s.name for s in sources]
    if not sources:
        raise ConfigError("SYNCLOCK_SOURCES", value, "needs at least one source")
    if len(set(names)) != len(names):
        raise ConfigError("SYNCLOCK_SOURCES", value, "source names must be unique")
    return tuple(sources)
