"""Configuration: durations with units, and errors that name the variable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from service.config import Settings, parse_duration_s, redact_url
from service.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30),
        ("5m", 300),
        ("6h", 21600),
        ("1d", 86400),
        ("45", 45),
        (" 2.5s ", 2.5),
    ],
)
def test_durations_accept_units(text: str, seconds: float) -> None:
    assert parse_duration_s("X", text, low_s=0.1, high_s=10**6) == seconds


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.lock_ttl_ms == 30_000
    assert settings.sync_interval_s == 6 * 3600
    assert settings.scheduler is True
    assert settings.embedded is True
    assert [s.name for s in settings.sources] == ["genai-prices"]


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("SYNCLOCK_LOCK_TTL", "30 parsecs", "expected a duration"),
        ("SYNCLOCK_LOCK_TTL", "0s", "must be between 100ms and 1h"),
        ("SYNCLOCK_LOCK_TTL", "2h", "must be between 100ms and 1h"),
        ("SYNCLOCK_SYNC_INTERVAL", "-6h", "expected a duration"),
        ("SYNCLOCK_SCHEDULER", "maybe", "expected on or off"),
        ("SYNCLOCK_REDIS_URL", "http://x", "must start with one of"),
        ("SYNCLOCK_DATABASE_URL", "mysql://u:secret@x/db", "must start with one of"),
        ("SYNCLOCK_DATABASE_SCHEMA", "Robert'); DROP", "lower-case SQL identifier"),
        ("SYNCLOCK_REDIS_PREFIX", "a{b}", "cannot contain braces"),
        ("SYNCLOCK_SOURCES", "or=ftp://x", "must be http(s)"),
        ("SYNCLOCK_SOURCES", "genai-prices,genai-prices", "must be unique"),
        ("SYNCLOCK_SOURCES", "Bad Name=https://x", "expected genai-prices or name="),
        ("SYNCLOCK_SOURCE_RETRIES", "many", "whole number"),
        ("SYNCLOCK_ADMIN_TOKENS", "short", "16+ characters"),
    ],
)
def test_bad_values_name_variable_and_problem(variable: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        Settings.from_env({variable: value})
    assert str(error.value).startswith(f"{variable}=")
    assert message in str(error.value)
    assert "secret" not in str(error.value)
    assert not (variable == "SYNCLOCK_ADMIN_TOKENS" and value in str(error.value))


def test_lock_ttl_cannot_exceed_maximum() -> None:
    with pytest.raises(ConfigError, match="cannot exceed SYNCLOCK_MAX_LOCK_TTL"):
        Settings.from_env({"SYNCLOCK_LOCK_TTL": "5m", "SYNCLOCK_MAX_LOCK_TTL": "1m"})


def test_redact_url_hides_password_only() -> None:
    assert redact_url("postgresql://app:s3cret@db:5432/x") == "postgresql://app:***@db:5432/x"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_cli_stops_on_bad_configuration_with_the_variable_named() -> None:
    env = {**os.environ, "SYNCLOCK_LOCK_TTL": "forever"}
    done = subprocess.run(
        [sys.executable, "-m", "service", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "SYNCLOCK_LOCK_TTL='forever'" in done.stderr
    assert "expected a duration" in done.stderr
