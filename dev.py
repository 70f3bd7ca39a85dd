#!/usr/bin/env python3
"""Bootstrap and run synclock with nothing but Python 3.11+ installed.

    python3 dev.py run     # the service on its embedded default (no Redis/Postgres needed)
    python3 dev.py test    # lint, type-check and the whole test suite
    python3 dev.py bench   # the benchmark (needs wrk, Redis and Postgres)
    python3 dev.py soak    # faults for --duration seconds (needs redis-server)

Each command creates ``.venv`` on first use and reinstalls when pyproject.toml changes.
Extra arguments go to the underlying command (``synclock serve`` or ``pytest``).
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"

# Where the test suite looks for real servers when the variables are not set.
LOCAL_REDIS = ("127.0.0.1", 6379, "redis://127.0.0.1:6379/0")
LOCAL_POSTGRES = ("127.0.0.1", 5432, "postgresql://postgres@127.0.0.1:5432/test")


def ensure_venv(extras: str) -> None:
    stamp = VENV / f".installed-{extras}"
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == wanted:
        return
    if not PYTHON.exists():
        print(f"dev.py: creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print(f"dev.py: installing synclock[{extras}] into {VENV}", flush=True)
    subprocess.run(
        [
            str(PYTHON),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-e",
            f"{ROOT}[{extras}]",
        ],
        check=True,
    )
    stamp.write_text(wanted)


def answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def run(argv: list[str]) -> int:
    ensure_venv("embedded")
    # Become the service: SIGTERM and Ctrl-C then reach it directly.
    os.execv(str(BIN / "synclock"), [str(BIN / "synclock"), "serve", *argv])


def test(argv: list[str]) -> int:
    ensure_venv("dev")
    env = dict(os.environ)
    for variable, (host, port, url) in (
        ("SYNCLOCK_TEST_REDIS_URL", LOCAL_REDIS),
        ("SYNCLOCK_TEST_DATABASE_URL", LOCAL_POSTGRES),
    ):
        if not env.get(variable) and answers(host, port):
            env[variable] = url
        print(f"dev.py: {variable}={env.get(variable, '(unset: integration tests skip)')}")
    sources = [p for p in ("service", "tests", "scripts", "dev.py") if (ROOT / p).exists()]
    steps = [
        [str(BIN / "ruff"), "check", *sources],
        [str(BIN / "ruff"), "format", "--check", *sources],
        [str(BIN / "mypy")],
        [str(PYTHON), "-m", "pytest", *argv],
    ]
    for step in steps:
        print(
            "dev.py: $ "
            + " ".join(Path(step[0]).name if i == 0 else a for i, a in enumerate(step)),
            flush=True,
        )
        code = subprocess.call(step, cwd=ROOT, env=env)
        if code != 0:
            return code
    return 0


def soak(argv: list[str]) -> int:
    ensure_venv("dev")
    return subprocess.call([str(PYTHON), str(ROOT / "scripts" / "soak.py"), *argv], cwd=ROOT)


def bench(argv: list[str]) -> int:
    ensure_venv("dev")
    return subprocess.call([str(PYTHON), str(ROOT / "scripts" / "bench.py"), *argv], cwd=ROOT)


def main() -> int:
    commands = {"run": run, "test": test, "bench": bench, "soak": soak}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(__doc__)
        return 2
    return commands[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
