"""The ``synclock`` command: serve, sync, migrate; and status, trigger, runs, release
against a running service."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from service import __version__, logs, opsclient
from service.config import Settings
from service.errors import BackendUnavailable, ConfigError
from service.records import RunRecord, RunStatus, Trigger

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_LOCK_HELD = 3
EXIT_UNAVAILABLE = 4

CONNECTION_DRAIN_S = 5.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="synclock", description=__doc__)
    parser.add_argument("--version", action="version", version=f"synclock {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    commands.add_parser("sync", help="run one sync through the lock and print a summary")
    commands.add_parser("migrate", help="apply database migrations and exit")
    opsclient.add_arguments(commands)
    args = parser.parse_args(argv)
    if args.command in ("status", "trigger", "runs", "release"):
        return opsclient.run(args)  # a client of a running service: no server settings

    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"synclock: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logs.configure(settings.log_level, settings.log_format)

    try:
        if args.command == "serve":
            return _serve(settings, args.host, args.port)
        if args.command == "sync":
            return asyncio.run(_sync(settings))
        return asyncio.run(_migrate(settings))
    except ConfigError as exc:
        print(f"synclock: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except BackendUnavailable as exc:
        print(f"synclock: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE


def _serve(settings: Settings, host: str, port: int) -> int:
    from aiohttp import web

    from service.http.app import create_app
    from service.http.auth import load_tokens

    tokens, generated = load_tokens(settings)
    if generated is not None:
        print(
            f"synclock: generated an admin token (kept in {tokens.origin.split(':', 1)[1]},"
            f" mode 0600):\n\n    {generated}\n",
            file=sys.stderr,
            flush=True,
        )
    elif tokens.origin.startswith("generated:"):
        print(
            f"synclock: admin token is in {tokens.origin.split(':', 1)[1]}",
            file=sys.stderr,
            flush=True,
        )
    web.run_app(
        create_app(settings, tokens),
        host=host,
        port=port,
        # After the running sync has had its grace period (on_shutdown), requests
        # still open get this much more: a slow client cannot double the stop time.
        shutdown_timeout=min(CONNECTION_DRAIN_S, settings.shutdown_timeout_s),
        print=lambda line: print(line, file=sys.stderr, flush=True),
        access_log=None,
    )
    return EXIT_OK


async def _sync(settings: Settings) -> int:
    from service.runtime import open_runtime
    from service.sync.job import SyncRunning

    async with open_runtime(settings) as runtime:
        await runtime.job.start()
        try:
            started = await runtime.job.trigger(Trigger.MANUAL, "cli")
        except SyncRunning as exc:
            print(
                f"a sync is already running: run {exc.holder.run_id} on "
                f"{exc.holder.owner}, lease ends in {exc.holder.remaining_ms} ms"
            )
            return EXIT_LOCK_HELD
        record = await runtime.job.wait(started.run_id, timeout_s=24 * 3600)
    if record is None:
        print(f"run {started.run_id}: no record found")
        return EXIT_FAILED
    print(summary(record))
    return EXIT_OK if record.status is RunStatus.SUCCEEDED else EXIT_FAILED


def summary(record: RunRecord) -> str:
    c = record.counts
    lines = [
        f"run {record.id}  status={record.status.value}  fence={record.fence}"
        f"  duration={record.duration_s or 0:.2f}s",
        f"  seen={c.seen} added={c.added} changed={c.changed} unchanged={c.unchanged}"
        f" deactivated={c.deactivated} rejected={c.rejected}",
    ]
    for source in record.sources:
        state = "ok" if source.get("ok") else f"FAILED: {source.get('error')}"
        lines.append(
            f"  {source.get('source')}: seen={source.get('seen')}"
            f" added={source.get('added')} changed={source.get('changed')} {state}"
        )
    return "\n".join(lines)


async def _migrate(settings: Settings) -> int:
    from service.runtime import open_runtime

    async with open_runtime(settings, migrate=False) as runtime:
        applied = await runtime.store.migrate()
    print("applied: " + ", ".join(applied) if applied else "database is up to date")
    return EXIT_OK
