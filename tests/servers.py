"""Throwaway Redis and PostgreSQL servers that a test may stop, kill and restart.

They listen on free loopback ports and are stopped by PID; the machine's shared
servers are never touched. PostgreSQL comes from the binaries bundled with the
``pgserver`` package, so no system install is needed; as root it runs under the
unprivileged user pgserver creates for itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def redis_argv(binary: str, port: int) -> list[str]:
    """A redis-server on loopback that keeps nothing on disk."""
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]


def missing(what: str) -> None:
    """Skip with the reason; under SYNCLOCK_REQUIRE_BACKENDS=1 (CI) fail instead."""
    if os.environ.get("SYNCLOCK_REQUIRE_BACKENDS", "") == "1":
        pytest.fail(f"{what} (SYNCLOCK_REQUIRE_BACKENDS=1)")
    pytest.skip(what)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until(check: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up within {timeout_s}s")


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class ThrowawayRedis:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            missing("redis-server is not installed")
        self.binary = binary
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [*redis_argv(self.binary, self.port), "--protected-mode", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_until(lambda: _accepts(self.port), 10, "redis-server")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=10)
        self.process = None


class ThrowawayPostgres:
    def __init__(self) -> None:
        try:
            from pgserver._commands import POSTGRES_BIN_PATH
        except ImportError:
            missing("pgserver (the dev extra) is not installed")
        self.bin = Path(POSTGRES_BIN_PATH)
        # Not under pytest's tmp_path: that is private to root, and postgres runs
        # as another user who must be able to reach its folder.
        root = Path(tempfile.mkdtemp(prefix="synclock-pg-"))
        self.root = root
        self.data = root / "pgdata"
        self.port = free_port()
        self.user: str | None = None
        self.process: subprocess.Popen[bytes] | None = None
        if os.geteuid() == 0:  # postgres refuses to run as root
            from pgserver.utils import ensure_user_exists

            ensure_user_exists("pgserver")
            self.user = "pgserver"
            root.chmod(0o755)
            shutil.chown(root, user="pgserver")
        subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            user=self.user,
            cwd=root,
        )

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        with (self.root / "postgres.log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(self.bin / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-h",
                    "127.0.0.1",
                    "-k",
                    str(self.root),
                    "-c",
                    "fsync=off",
                ],
                stdout=log,
                stderr=log,
                user=self.user,
                cwd=self.root,
                start_new_session=True,  # its own process group: a kill takes the backends too
            )
        _wait_until(lambda: _accepts(self.port), 30, "postgres")
        time.sleep(0.2)  # accepting TCP precedes accepting logins by a moment

    def stop(self, sig: int = signal.SIGINT) -> None:
        """SIGINT: fast shutdown (clients disconnected); SIGKILL: a crash."""
        if self.process is not None and self.process.poll() is None:
            if sig == signal.SIGKILL:
                os.killpg(self.process.pid, sig)
            else:
                self.process.send_signal(sig)
            self.process.wait(timeout=30)
        self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
