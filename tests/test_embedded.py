"""The fresh-machine default: no Redis, no Postgres configured.

Starts the real ``synclock serve`` process on an in-process Redis and an embedded
PostgreSQL under a temporary data folder, and checks what a person would see.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def call(url: str, method: str = "GET", token: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def wait_for(check: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result = check()
        except OSError:
            result = None
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def start(data_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCLOCK_")}
    env.update(
        {
            "SYNCLOCK_DATA_DIR": str(data_dir),
            "SYNCLOCK_LOG_FORMAT": "json",
            "SYNCLOCK_INSTANCE": "embedded-test",
        }
    )
    with log.open("ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(port)],
            env=env,
            stdout=sink,
            stderr=sink,
        )


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
        raise


def test_embedded_default_starts_syncs_real_prices_and_answers(tmp_path: Path) -> None:
    data_dir, log = tmp_path / "data", tmp_path / "serve.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = start(data_dir, port, log)
    try:
        wait_for(lambda: call(f"{base}/readyz")[0] == 200, 90, "/readyz")
        token_file = data_dir / "admin-token"
        token = token_file.read_text().strip()
        output = log.read_text()

        assert token in output  # printed once at start-up for the person at the terminal
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert '"event": "embedded_default"' in output
        runs = wait_for(
            lambda: [
                r
                for r in call(f"{base}/admin/pricing/sync/runs", token=token)[1]["runs"]
                if r["status"] == "succeeded"
            ],
            60,
            "the first scheduled sync",
        )
        assert runs[0]["trigger"] == "scheduled"
        assert runs[0]["counts"]["added"] > 2_000
        assert call(f"{base}/admin/pricing/sync/runs")[0] == 401
        status, body = call(f"{base}/admin/pricing/scheduler/trigger?wait=30", "POST", token)
        assert status == 200 and body["counts"]["unchanged"] == runs[0]["counts"]["added"]
    finally:
        code = stop(process)
    assert code == 0
    assert "Traceback" not in log.read_text()

    # A restart keeps the data and the token, and does not print the token again.
    restart_log = tmp_path / "restart.log"
    process = start(data_dir, port, restart_log)
    try:
        wait_for(lambda: call(f"{base}/readyz")[0] == 200, 90, "/readyz after restart")
        status, body = call(f"{base}/admin/pricing/sync/runs", token=token)
        assert status == 200 and len(body["runs"]) == 2
    finally:
        assert stop(process) == 0
    assert token not in restart_log.read_text()
