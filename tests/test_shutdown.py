"""Stopping a real ``synclock serve`` process while a client holds a request open."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

from service.cli import CONNECTION_DRAIN_S
from tests.conftest import ADMIN_TOKEN
from tests.replicas import Replica


def test_a_slow_client_cannot_hold_shutdown_past_the_connection_drain(
    env: dict[str, str], tmp_path: Path
) -> None:
    replica = Replica("slow-client", {**env, "SYNCLOCK_SHUTDOWN_TIMEOUT": "8s"}, tmp_path)
    replica.start().wait_ready()
    client = socket.create_connection(("127.0.0.1", replica.port), timeout=30)
    try:
        # Headers and the first byte of a 100-byte body, then nothing more.
        client.sendall(
            b"DELETE /admin/pricing/sync/lock HTTP/1.1\r\nHost: synclock\r\n"
            + f"Authorization: Bearer {ADMIN_TOKEN}\r\n".encode()
            + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        time.sleep(0.3)  # the handler now waits for the rest of the body
        began = time.monotonic()
        replica.send(signal.SIGTERM)
        code = replica.wait_exit(30)
        took = time.monotonic() - began
    finally:
        client.close()
        replica.stop(signal.SIGKILL)

    assert code == 0
    # No sync ran, so nothing used the 8 s grace; the open request got the drain
    # budget (5 s) and no more. Before that budget existed it got the whole 8 s.
    assert CONNECTION_DRAIN_S - 0.5 <= took < CONNECTION_DRAIN_S + 2.0, took
    assert [e["event"] for e in replica.events("stopped")] == ["stopped"]
