"""Prototype."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

from tests.conftest import ADMIN_TOKEN
from tests.servers import free_port

DB_PASSWORD = "s3cret-db-pass"
REDIS_PASSWORD = "s3cret-redis-pass"


def with_password(url: str, password: str) -> tuple[str, str]:
    parts = urlsplit(url)
    if parts.password:
        return url, parts.password
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:{password}@{host}").geturl(), password


@dataclass
class LiveService:
    base_url: str
    log_path: Path
    process: subprocess.Popen[bytes]
    secrets: tuple[str, ...]
    answers: list[str] = field(default_factory=list)


def start(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCLOCK_")}
    child_env.update(env)
    with log_path.open("ab") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(port)],
            env=child_env,
            stdout=sink,
            stderr=sink,
        )
    return process, port


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
        raise


@pytest.fixture
def live_service(env: dict[str, str], tmp_path: Path, real_redis: Any) -> Iterator[LiveService]:
    database_url, db_secret = with_password(env["SYNCLOCK_DATABASE_URL"], DB_PASSWORD)
    redis_url, redis_secret = with_password(env["SYNCLOCK_REDIS_URL"], REDIS_PASSWORD)
    log_path = tmp_path / "serve.log"
    process, port = start(
        {
            **env,
            "SYNCLOCK_DATABASE_URL": database_url,
            "SYNCLOCK_REDIS_URL": redis_url,
            "SYNCLOCK_LOG_FORMAT": "json",
        },
        log_path,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "service not ready"
            time.sleep(0.1)
        yield LiveService(base_url, log_path, process, (ADMIN_TOKEN, db_secret, redis_secret))
    finally:
        stop(process)


@pytest.fixture
def live_api(live_service: LiveService) -> Any:
    config = schemathesis.Config.from_dict(
        {
            "headers": {"Authorization": f"Bearer {ADMIN_TOKEN}"},
            "request-timeout": 10,
            "generation": {"database": "none"},
        }
    )
    return schemathesis.openapi.from_url(f"{live_service.base_url}/openapi.json", config=config)


api = schemathesis.pytest.from_fixture("live_api")


@settings(
    max_examples=30,
    deadline=timedelta(seconds=5),
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@api.parametrize()
def test_contract(case: Any, live_service: LiveService) -> None:
    response = case.call()
    live_service.answers.append(response.text)
    case.validate_response(response)
