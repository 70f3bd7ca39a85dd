"""Real ``synclock serve`` processes, and an upstream catalog they can be stalled on.

Fault tests start replicas as subprocesses so they can be killed (SIGKILL), paused
(SIGSTOP/SIGCONT) and shut down (SIGTERM) like the real thing. Every process is
stopped by PID when the test ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.servers import free_port
from tests.upstream import MODELS


class Replica:
    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCLOCK_")}
        self.env.update(env)
        self.env.update({"SYNCLOCK_INSTANCE": name, "SYNCLOCK_LOG_FORMAT": "json"})
        self.log = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Replica:
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service", "serve", "--port", str(self.port)],
                env=self.env,
                stdout=sink,
                stderr=sink,
            )
        return self

    def wait_ready(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, self.output()
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not ready after {timeout_s}s:\n{self.output()}")

    def send(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int | None:
        """Stop by PID; a paused process is resumed first so it can die."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        code = self.process.returncode
        self.process = None
        return code

    def wait_exit(self, timeout_s: float) -> int:
        assert self.process is not None
        code = self.process.wait(timeout=timeout_s)
        self.process = None
        return code

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.output().splitlines():
            if line.startswith("{") and f'"event": "{name}"' in line:
                found.append(json.loads(line))
        return found


class GatedUpstream:
    """An OpenRouter-style catalog in a thread. Each request takes the next mode
    from ``modes`` ("gate": hold the answer until ``gate`` opens; "ok"; "500"),
    then ``default``. ``payloads`` likewise gives each answer's body."""

    def __init__(self) -> None:
        self.modes: list[str] = []
        self.default = "ok"
        self.payloads: list[Any] = []
        self.payload: Any = MODELS
        self.gate = threading.Event()
        self.delay_s = 0.0  # every answer waits this long (a slow upstream)
        self.requests = 0
        self.history: list[str] = []  # arrivals and answers, UTC times as in replica logs
        self.arrived = threading.Event()
        self._lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with upstream._lock:
                    upstream.requests += 1
                    mode = upstream.modes.pop(0) if upstream.modes else upstream.default
                    body = upstream.payloads.pop(0) if upstream.payloads else upstream.payload
                upstream.arrived.set()
                upstream.history.append(f"{utc_now()} arrived ({mode})")
                if mode == "gate":
                    upstream.gate.wait(60)
                time.sleep(upstream.delay_s)
                upstream.history.append(f"{utc_now()} answering")
                status = 500 if mode == "500" else 200
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the replica that asked was killed meanwhile

            def log_message(self, *_: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/api/v1/models"

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


def utc_now() -> str:
    """Wall-clock UTC, comparable with the ``timestamp`` of the replicas' log lines."""
    return datetime.now(UTC).strftime("%H:%M:%S.%f")


def priced(price_per_token: str, *ids: str) -> dict[str, Any]:
    """A catalog body where every model costs ``price_per_token``."""
    return {
        "data": [
            {"id": model, "pricing": {"prompt": price_per_token, "completion": price_per_token}}
            for model in ids
        ]
    }


def kill_group(replicas: list[Replica]) -> None:
    for replica in replicas:
        replica.stop(signal.SIGKILL, timeout_s=10)
