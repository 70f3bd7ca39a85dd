"""The live service against its own OpenAPI document, and what it must never say.

Each test starts the real ``python -m service serve`` as a subprocess (stopped by
PID at the end) on the test's own Redis prefix and Postgres schema. Its backend
URLs carry passwords that the test servers ignore (trust auth, no ``requirepass``),
so there is something to look for: the admin token and those passwords must never
show up in a response, a header, ``/metrics`` or the process's own output.

schemathesis loads the document from the running process and generates requests
for every operation. Its pytest plugin cannot load a schema from a fixture here
(``schemathesis.pytest.from_fixture`` in 4.32 sets ``Node._nodeid``, which pytest 9.2
no longer has), so each operation's strategy runs under ``@given`` inside the test.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.conftest import ADMIN_TOKEN
from tests.replicas import Replica
from tests.servers import ThrowawayRedis

DATABASE_PASSWORD = "s3cret-db-pass"
REDIS_PASSWORD = "s3cret-redis-pass"
WRONG_TOKEN = "wrong-admin-token-9876543210"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TRIGGER = "/admin/pricing/scheduler/trigger"
RUNS = "/admin/pricing/sync/runs"
LOCK = "/admin/pricing/sync/lock"
PROBLEM = "application/problem+json"
REQUEST_TIMEOUT_S = 35.0  # above the ?wait=30 the secrets test asks for

MAX_EXAMPLES = 40
EXAMPLE_DEADLINE = timedelta(seconds=5)
# What the document promises about every answer; 5xx is never an answer. Left out:
# positive_data_acceptance and negative_data_rejection, which judge input validation
# and fail today: the document allows any number for ?wait= (the handler takes plain
# decimals up to SYNCLOCK_MAX_WAIT) and any string for "reason" (the handler wants
# printable text), while an empty ?status= or ?wait= is taken as absent.
CONFORMANCE_CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "ignored_auth",  # a 2xx with the token is re-sent without it and with a wrong one
)


def with_password(url: str, password: str) -> tuple[str, str]:
    """``url`` carrying ``password`` in its user-info, and the password to look for
    (the URL's own, if it already has one)."""
    parts = urlsplit(url)
    if parts.password:
        return url, parts.password
    if not parts.hostname:  # a unix socket: nowhere to put one
        return url, password
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username or ''}:{password}@{host}").geturl(), password


class Served:
    """Starts ``synclock serve`` replicas with password-bearing backend URLs."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.replicas: list[Replica] = []
        self.secrets: set[str] = {ADMIN_TOKEN}

    def start(self, name: str, **overrides: str) -> Replica:
        merged = {**self.env, **overrides}
        urls = {}
        for variable, password in (
            ("SYNCLOCK_DATABASE_URL", DATABASE_PASSWORD),
            ("SYNCLOCK_REDIS_URL", REDIS_PASSWORD),
        ):
            urls[variable], secret = with_password(merged[variable], password)
            self.secrets.add(secret)
        replica = Replica(name, {**merged, **urls}, self.log_dir)
        self.replicas.append(replica)
        replica.start().wait_ready()
        return replica

    def stop_all(self) -> None:
        for replica in reversed(self.replicas):
            replica.stop()


@pytest.fixture
def served(env: dict[str, str], tmp_path: Path, real_redis: Any) -> Iterator[Served]:
    # real_redis: its teardown removes the keys under the test's prefix.
    launcher = Served(env, tmp_path)
    try:
        yield launcher
    finally:
        launcher.stop_all()


@pytest.fixture
def own_redis() -> Iterator[ThrowawayRedis]:
    server = ThrowawayRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def contract_config() -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "auth": {"openapi": {"admin": {"bearer": ADMIN_TOKEN}}},
            "request-timeout": 10,
            "checks": {
                "enabled": False,
                **{name: {"enabled": True} for name in CONFORMANCE_CHECKS},
            },
        }
    )


def modes_for(operation: schemathesis.APIOperation) -> list[GenerationMode]:
    """Negative data needs something to break: a parameter or a body."""
    has_inputs = any(True for _ in operation.iter_parameters()) or bool(operation.body)
    return list(GenerationMode) if has_inputs else [GenerationMode.POSITIVE]


def fuzz(
    operation: schemathesis.APIOperation, mode: GenerationMode, answers: dict[str, list[str]]
) -> str | None:
    """Run one operation's strategy; the failure report (with a curl line), if any."""

    @given(case=operation.as_strategy(mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=EXAMPLE_DEADLINE,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def check(case: schemathesis.Case) -> None:
        response = case.call()
        answers.setdefault(operation.label, []).append(
            f"{response.status_code} {json.dumps(dict(response.headers))} {response.text}"
        )
        case.validate_response(response)

    try:
        check()
    # Hypothesis re-raises the shrunk failure: schemathesis's FailureGroup (a
    # BaseExceptionGroup), a deadline overrun or a transport error.
    except (Exception, schemathesis.errors.FailureGroup) as exc:
        return f"{operation.label} ({mode.value} data): {exc}"
    return None


def leaks(secrets: set[str], **texts: str) -> list[str]:
    return [
        f"{secret!r} in {where}"
        for where, text in texts.items()
        for secret in secrets
        if secret in text
    ]


def test_live_service_answers_as_its_openapi_document_says(served: Served) -> None:
    replica = served.start("contract")
    schema = schemathesis.openapi.from_url(f"{replica.url}/openapi.json", config=contract_config())
    operations = [result.ok() for result in schema.get_all_operations()]
    answers: dict[str, list[str]] = {}

    failures = [
        failure
        for operation in operations
        for mode in modes_for(operation)
        if (failure := fuzz(operation, mode, answers)) is not None
    ]
    code = replica.stop()
    output = replica.output()

    assert not failures, "\n\n".join(failures)
    assert sorted(answers) == sorted(operation.label for operation in operations)
    everything = "\n".join(text for texts in answers.values() for text in texts)
    assert leaks(served.secrets, answers=everything, output=output) == []
    assert code == 0
    assert "Traceback" not in output and '"level": "error"' not in output


def test_every_admin_operation_refuses_a_missing_or_wrong_token(served: Served) -> None:
    replica = served.start("auth")
    with requests.Session() as http:
        document = http.get(f"{replica.url}/openapi.json", timeout=5).json()
        admin = [
            (method.upper(), path)
            for path, item in document["paths"].items()
            for method in item
            if path.startswith("/admin/")
        ]
        refused = []
        for method, path in admin:
            url = replica.url + path.replace("{run_id}", str(uuid.uuid4()))
            for headers in (
                {},
                {"Authorization": f"Bearer {WRONG_TOKEN}"},
                {"Authorization": "Bearer "},
                {"Authorization": f"Basic {ADMIN_TOKEN}"},
                {"Authorization": ADMIN_TOKEN},
            ):
                answer = http.request(
                    method, url, headers=headers, json={"reason": "contract"}, timeout=5
                )
                refused.append((method, path, headers, answer))

    assert admin
    wrong = [
        (method, path, headers, answer.status_code)
        for method, path, headers, answer in refused
        if answer.status_code != 401
        or answer.headers["Content-Type"].partition(";")[0] != PROBLEM
        or answer.headers.get("WWW-Authenticate") != 'Bearer realm="synclock"'
        or answer.json()["type"] != "urn:synclock:problem:unauthorized"
    ]
    assert wrong == []
    assert leaks(served.secrets, answers="\n".join(a.text for *_, a in refused)) == []


class Recorder:
    """Every answer the service gave, headers and body, for the secrets scan."""

    def __init__(self, http: requests.Session, base_url: str) -> None:
        self.http = http
        self.base_url = base_url
        self.answers: list[requests.Response] = []

    def __call__(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        answer = self.http.request(
            method, self.base_url + path, timeout=REQUEST_TIMEOUT_S, **kwargs
        )
        self.answers.append(answer)
        return answer

    def text(self) -> str:
        return "\n".join(
            f"{a.status_code} {json.dumps(dict(a.headers))} {a.text}" for a in self.answers
        )


def first(tries: int, call: Callable[[], requests.Response], status: int) -> requests.Response:
    """Repeat ``call`` (bounded) until it answers ``status``; the last answer."""
    for _ in range(tries):
        answer = call()
        if answer.status_code == status:
            break
    return answer


def test_token_and_backend_passwords_never_leave_the_process(
    served: Served, own_redis: ThrowawayRedis
) -> None:
    # A Redis of its own, so it can be stopped for the 503 without touching the shared one.
    replica = served.start("secrets", SYNCLOCK_REDIS_URL=own_redis.url)
    oversized = json.dumps({"reason": "x" * 70_000})
    with requests.Session() as http:
        call = Recorder(http, replica.url)
        succeeded = call("POST", f"{TRIGGER}?wait=30", headers=AUTH)

        def trigger_twice() -> requests.Response:
            call("POST", TRIGGER, headers=AUTH)
            return call("POST", TRIGGER, headers=AUTH)

        busy = first(20, trigger_twice, 429)
        unauthorized = call("GET", RUNS, headers={"Authorization": f"Bearer {WRONG_TOKEN}"})
        call("GET", RUNS)
        missing = call("GET", f"{RUNS}/{uuid.uuid4()}", headers=AUTH)
        call("GET", "/no/such/route")
        bad_limit = call("GET", f"{RUNS}?limit=0", headers=AUTH)
        call("POST", f"{TRIGGER}?wait=soon", headers=AUTH)
        call("GET", f"{RUNS}/not-a-uuid", headers=AUTH)
        call("DELETE", LOCK, headers={**AUTH, "Content-Type": "application/json"}, data="{")
        call("DELETE", LOCK, headers={**AUTH, "Content-Type": "text/plain"}, data="x")
        too_large = call(
            "DELETE", LOCK, headers={**AUTH, "Content-Type": "application/json"}, data=oversized
        )
        call("DELETE", LOCK, headers=AUTH, json={"reason": "secrets scan"})
        call("PUT", "/healthz")
        call("GET", "/admin/pricing/scheduler/status", headers=AUTH)
        call("GET", RUNS, headers=AUTH)
        call("GET", "/openapi.json")
        metrics = call("GET", "/metrics")

        own_redis.stop()
        down = call("POST", TRIGGER, headers=AUTH)
        not_ready = call("GET", "/readyz")
        call("GET", "/admin/pricing/scheduler/status", headers=AUTH)

    replica.stop()
    output = replica.output()

    assert succeeded.status_code == 200 and succeeded.json()["status"] == "succeeded"
    assert busy.status_code == 429
    assert unauthorized.status_code == 401
    assert missing.status_code == 404
    assert bad_limit.status_code == 400
    assert too_large.status_code == 413
    assert down.status_code == 503 and down.json()["backend"] == "redis"
    assert not_ready.status_code == 503
    assert "synclock_http_requests_total" in metrics.text
    assert leaks(served.secrets, answers=call.text(), output=output) == []
    # The scan looked where the URLs are: the start-up line names both, redacted.
    backends = replica.events("backends")[0]
    assert ":***@" in backends["postgres"] and ":***@" in backends["redis"]
    assert replica.events("backend_unavailable")
