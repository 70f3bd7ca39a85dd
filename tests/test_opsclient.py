"""The operator commands against a real ``synclock serve`` process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ADMIN_TOKEN
from tests.replicas import GatedUpstream, Replica
from tests.servers import free_port


@pytest.fixture
def served(env: dict[str, str], tmp_path: Path) -> Iterator[tuple[Replica, GatedUpstream]]:
    upstream = GatedUpstream()
    upstream.modes = ["gate"]
    replica = Replica("ops", {**env, "SYNCLOCK_SOURCES": f"slow={upstream.url}"}, tmp_path)
    replica.start().wait_ready()
    yield replica, upstream
    replica.stop()
    upstream.close()


def synclock(url: str, *args: str, token: str = ADMIN_TOKEN) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SYNCLOCK_")}
    environment.update({"SYNCLOCK_URL": url, "SYNCLOCK_TOKEN": token})
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_trigger_status_runs_release_with_exit_codes(
    served: tuple[Replica, GatedUpstream],
) -> None:
    replica, upstream = served

    started = synclock(replica.url, "trigger")
    busy = synclock(replica.url, "trigger")
    status = synclock(replica.url, "status")
    as_json = json.loads(synclock(replica.url, "status", "--json").stdout)
    released = synclock(replica.url, "release", "--reason", "ops test")
    upstream.gate.set()
    waited = synclock(replica.url, "trigger", "--wait", "30")
    runs = synclock(replica.url, "runs", "--limit", "5")
    lost = synclock(replica.url, "runs", "--status", "lost_lease", "--json")

    assert started.returncode == 0 and started.stdout.startswith("started run ")
    assert busy.returncode == 3 and "already running" in busy.stdout
    assert status.returncode == 0 and "held" in status.stdout and "ops run" in status.stdout
    assert as_json["lock"]["held"] is True
    assert released.returncode == 0 and released.stdout.startswith("released: was ops run")
    assert waited.returncode == 0 and "succeeded" in waited.stdout
    assert runs.returncode == 0 and len(runs.stdout.splitlines()) == 3  # header + 2 runs
    assert [r["status"] for r in json.loads(lost.stdout)["runs"]] == ["lost_lease"]


def test_wrong_token_and_unreachable_service_have_their_own_codes(
    served: tuple[Replica, GatedUpstream],
) -> None:
    replica, _ = served
    refused = synclock(replica.url, "status", token="wrong-token-0123456789")
    unreachable = synclock(f"http://127.0.0.1:{free_port()}", "status")
    missing = synclock(replica.url, "status", token="")

    assert refused.returncode == 5 and "HTTP 401" in refused.stderr
    assert unreachable.returncode == 4 and "cannot reach" in unreachable.stderr
    assert missing.returncode == 2 and "no token" in missing.stderr


def test_redirects_are_not_followed_and_odd_answers_are_not_tracebacks(tmp_path: Path) -> None:
    """A redirect would carry the token elsewhere; junk answers get exit 6."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[str] = []

    class Odd(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(f"{self.path} {self.headers.get('Authorization')}")
            if self.path.startswith("/html404"):  # some other web server's error page
                self.answer(404, b"<html>Not Found</html>")
                return
            if self.path.startswith("/steal"):
                self.send_response(200)
                self.end_headers()
                return
            if "runs" in self.path:
                body, status = b"<html>not json</html>", 200
            else:
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/steal")
                self.end_headers()
                return
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            self.answer(429, b"<html>Too Many Requests</html>")

        def answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Odd)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        redirected = synclock(url, "status")
        junk = synclock(url, "runs")
        bad_wait = synclock(url, "trigger", "--wait", "nan")
        bad_url = synclock("http://[::1", "status")
        not_found_page = synclock(url + "/html404", "status")
        html_429 = synclock(url, "trigger")
    finally:
        server.shutdown()
        server.server_close()

    assert redirected.returncode == 6 and "Traceback" not in redirected.stderr
    assert not any(line.startswith("/steal") for line in seen)  # the token never followed
    assert junk.returncode == 6 and "unexpected answer" in junk.stderr
    assert bad_wait.returncode == 2 and "not a number of seconds" in bad_wait.stderr
    assert bad_url.returncode == 2 and "Traceback" not in bad_url.stderr
    # Another server's 404 or 429 page is not a usage error or a busy lock.
    assert not_found_page.returncode == 6 and "not an answer of synclock" in not_found_page.stderr
    assert html_429.returncode == 6 and "not an answer of synclock" in html_429.stderr


def test_tokens_and_urls_that_cannot_be_sent_are_usage_errors_and_never_echoed() -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    secret = "Zq9-secret-token-value-0123456789"
    with_crlf = synclock(nowhere, "status", token=secret + "\r\n")  # a CRLF token file
    with_cr = synclock(nowhere, "status", token=secret[:9] + "\r" + secret[9:])
    non_ascii = synclock(nowhere, "status", token=secret + "\u20ac")
    with_password = synclock(f"http://ops:{secret}@127.0.0.1:1", "status")
    with_space = synclock(nowhere + "/ x", "status")
    no_timeout = synclock(nowhere, "status", "--timeout", "0")

    assert with_crlf.returncode == 4 and "cannot reach" in with_crlf.stderr  # sent, trimmed
    assert with_cr.returncode == 2 and secret[9:] not in with_cr.stderr
    assert non_ascii.returncode == 2 and secret not in non_ascii.stderr
    assert "an HTTP header cannot carry" in non_ascii.stderr
    assert with_password.returncode == 2 and secret not in with_password.stderr
    assert with_space.returncode == 2 and "spaces" in with_space.stderr
    assert no_timeout.returncode == 2 and "above 0" in no_timeout.stderr


def test_an_empty_url_variable_means_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from service import opsclient

    monkeypatch.setenv("SYNCLOCK_URL", "")
    parser = argparse.ArgumentParser()
    opsclient.add_arguments(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["status"]).url == opsclient.DEFAULT_URL


def test_trigger_wait_outlasts_the_timeout_and_says_when_the_run_is_still_going(
    served: tuple[Replica, GatedUpstream],
) -> None:
    import threading
    import time

    replica, upstream = served
    upstream.modes = ["gate", "gate"]  # both runs stall upstream until the gate opens
    still_going = synclock(replica.url, "trigger", "--wait", "0.5")
    upstream.gate.set()
    for _ in range(100):  # the first run ends
        if "running" not in synclock(replica.url, "runs", "--limit", "1").stdout:
            break
        time.sleep(0.05)
    upstream.gate.clear()
    opener = threading.Timer(2.0, upstream.gate.set)
    opener.start()
    try:  # the second run ends 2 s from now: past --timeout 1, within --wait 20
        waited = synclock(replica.url, "trigger", "--wait", "20", "--timeout", "1")
    finally:
        opener.cancel()
        upstream.gate.set()

    assert still_going.returncode == 7 and "still running after 0.5 s" in still_going.stdout
    assert waited.returncode == 0 and "succeeded" in waited.stdout, waited.stderr


def test_a_reader_that_stops_early_is_not_an_unreachable_service(
    served: tuple[Replica, GatedUpstream],
) -> None:
    replica, upstream = served
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SYNCLOCK_")}
    environment.update({"SYNCLOCK_URL": replica.url, "SYNCLOCK_TOKEN": ADMIN_TOKEN})
    outcomes = []
    for command in (["trigger"], ["trigger"], ["status", "--json"], ["runs", "--json"]):
        # As in `synclock runs --json | head -1`: the reader is gone before we write.
        process = subprocess.Popen(
            [sys.executable, "-m", "service", *command],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert process.stdout is not None
        process.stdout.close()
        _, errors = process.communicate(timeout=60)
        outcomes.append((command[0], process.returncode, errors.decode()))
    upstream.gate.set()

    # The exit codes are the commands' own: started, already running (3), read.
    assert outcomes == [("trigger", 0, ""), ("trigger", 3, ""), ("status", 0, ""), ("runs", 0, "")]
