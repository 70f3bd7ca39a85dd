"""The operator commands (status, trigger, runs, release): a thin client of the HTTP API.

They talk to a running service, so they need its URL and an admin token, from
flags or from ``SYNCLOCK_URL`` / ``SYNCLOCK_TOKEN``. Exit codes are stable for
scripts: 0 ok, 1 the run did not succeed, 2 usage, 3 a sync is already running,
4 service or backend unavailable, 5 token refused, 6 an answer the client cannot
read (not synclock's API, a redirect, a 5xx other than 503), 7 ``trigger --wait``
returned while the run was still going.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_USAGE = 2
EXIT_LOCK_HELD = 3
EXIT_UNAVAILABLE = 4
EXIT_UNAUTHORIZED = 5
EXIT_UNEXPECTED = 6
EXIT_STILL_RUNNING = 7

DEFAULT_URL = "http://127.0.0.1:8080"
PROBLEM_PREFIX = "urn:synclock:problem:"


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: it would carry the admin token to another host."""

    def redirect_request(self, *_: Any, **__: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def _seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0 or value > 86_400:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 to 86400)")
    return value


def _timeout(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be above 0: a request never waits forever")
    return value


class Answer:
    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body


def add_arguments(commands: Any) -> None:
    """Register status, trigger, runs and release on the CLI's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("SYNCLOCK_URL") or DEFAULT_URL)
    common.add_argument("--token", default=os.environ.get("SYNCLOCK_TOKEN", ""))
    common.add_argument("--json", action="store_true", help="print the API's JSON")
    common.add_argument(
        "--timeout",
        type=_timeout,
        default=10.0,
        help="seconds to wait for the service at each step (trigger --wait adds its S)",
    )
    commands.add_parser("status", parents=[common], help="lock holder, running run, schedule")
    trigger = commands.add_parser("trigger", parents=[common], help="start a sync")
    trigger.add_argument("--wait", type=_seconds, default=0.0, metavar="S")
    runs = commands.add_parser("runs", parents=[common], help="recent runs, newest first")
    runs.add_argument("--limit", type=int, default=20)
    runs.add_argument("--status", default="")
    release = commands.add_parser("release", parents=[common], help="force-release the lock")
    release.add_argument("--reason", required=True)


def call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Answer:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(args.url.rstrip("/") + path, data=data, method=method)
    request.add_header("Authorization", f"Bearer {args.token}")
    request.add_header("X-Requested-By", "synclock-cli")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    # The server may legitimately hold a trigger for up to --wait seconds.
    timeout_s = args.timeout + getattr(args, "wait", 0.0)
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            return Answer(response.status, json.loads(response.read() or b"null"))
    except urllib.error.HTTPError as error:
        try:
            return Answer(error.code, json.loads(error.read() or b"null"))
        except ValueError:
            return Answer(error.code, None)


def run(args: argparse.Namespace) -> int:
    args.token = args.token.strip()  # a token file written with CRLF, say
    if not args.token:
        print("synclock: no token: pass --token or set SYNCLOCK_TOKEN", file=sys.stderr)
        return EXIT_USAGE
    if not (args.token.isascii() and args.token.isprintable()) or " " in args.token:
        # Never echo it: it is a secret, and probably a real one with a stray byte.
        print(
            "synclock: the token has a space, a control or a non-ASCII character,"
            " which an HTTP header cannot carry",
            file=sys.stderr,
        )
        return EXIT_USAGE
    authority = args.url.partition("://")[2].partition("/")[0]
    if "@" in authority:
        print(
            "synclock: --url must not carry a user or password; the token goes in"
            " --token or SYNCLOCK_TOKEN",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if not args.url.isprintable() or any(c.isspace() for c in args.url):
        print(f"synclock: --url {args.url!r} has spaces or control characters", file=sys.stderr)
        return EXIT_USAGE
    try:
        parts = urllib.parse.urlsplit(args.url)
        parts.port  # noqa: B018 - parses the port, raising on nonsense
    except ValueError as exc:
        print(f"synclock: --url {args.url!r} is not a URL: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if parts.scheme not in ("http", "https") or not parts.hostname:
        print(f"synclock: --url {args.url!r} must be http(s)://host[:port]", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "status":
            return _status(args)
        if args.command == "trigger":
            return _trigger(args)
        if args.command == "runs":
            return _runs(args)
        return _release(args)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"synclock: cannot reach {args.url}: {reason}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (ValueError, KeyError, TypeError, AttributeError, http.client.HTTPException) as exc:
        # Not the answer synclock's API gives: say so instead of a traceback.
        print(f"synclock: unexpected answer from {args.url}: {exc!r}"[:300], file=sys.stderr)
        return EXIT_UNEXPECTED


def _is_problem(body: Any) -> bool:
    """A problem document of synclock's own, not some other server's error page."""
    return isinstance(body, dict) and str(body.get("type", "")).startswith(PROBLEM_PREFIX)


def _refused(answer: Answer) -> int | None:
    """The exit code for an error answer, after saying what it was."""
    if 200 <= answer.status < 300 and isinstance(answer.body, dict):
        return None
    if answer.status < 400 or not _is_problem(answer.body):
        print(f"synclock: HTTP {answer.status}, not an answer of synclock's API", file=sys.stderr)
        return EXIT_UNEXPECTED
    detail = answer.body.get("detail") if isinstance(answer.body, dict) else ""
    print(f"synclock: HTTP {answer.status}: {detail}", file=sys.stderr)
    if answer.status == 401:
        return EXIT_UNAUTHORIZED
    if answer.status == 503:
        return EXIT_UNAVAILABLE
    if answer.status < 300 or answer.status >= 500:
        return EXIT_UNEXPECTED
    return EXIT_USAGE


def _emit(args: argparse.Namespace, body: Any, text: str) -> None:
    try:
        print(json.dumps(body, indent=2) if args.json else text, flush=True)
    except BrokenPipeError:
        # The reader stopped early (`| head`). That is not the service being
        # unreachable: the rest of the output goes nowhere, the exit code stands.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _status(args: argparse.Namespace) -> int:
    answer = call(args, "GET", "/admin/pricing/scheduler/status")
    if (code := _refused(answer)) is not None:
        return code
    body = answer.body
    lock, holder = body["lock"], body["lock"]["holder"]
    rows = [
        ("lock", f"{lock['name']} ({'held' if lock['held'] else 'free'})"),
        ("holder", f"{holder['owner']} run {holder['run_id']}" if holder else "-"),
        ("fence", str(holder["fence"] if holder else lock["last_fence"])),
        ("lease left", f"{holder['lease_remaining_ms']} ms" if holder else "-"),
        ("last success", body["last_success_at"] or "never"),
        ("next scheduled", body["scheduler"]["next_run_at"] or "-"),
        ("instance asked", body["instance"]),
    ]
    _emit(args, body, "\n".join(f"{k:<16}{v}" for k, v in rows))
    return EXIT_OK


def _trigger(args: argparse.Namespace) -> int:
    path = "/admin/pricing/scheduler/trigger"
    if args.wait > 0:
        path += "?wait=" + f"{args.wait:.3f}".rstrip("0").rstrip(".")
    answer = call(args, "POST", path)
    if answer.status == 429 and _is_problem(answer.body):
        holder = answer.body["holder"]
        _emit(
            args,
            answer.body,
            f"already running: run {holder['run_id']} on {holder['owner']}"
            f" (fence {holder['fence']}); retry in {answer.body['retry_after_s']} s",
        )
        return EXIT_LOCK_HELD
    if (code := _refused(answer)) is not None:
        return code
    body = answer.body
    if answer.status == 202:
        if args.wait > 0:
            _emit(
                args,
                body,
                f"still running after {args.wait:g} s: run {body['run_id']}"
                f" (fence {body['fence']}); follow it with `synclock runs`",
            )
            return EXIT_STILL_RUNNING
        _emit(args, body, f"started run {body['run_id']} (fence {body['fence']})")
        return EXIT_OK
    _emit(args, body, _run_table([body]))
    return EXIT_OK if body["status"] == "succeeded" else EXIT_RUN_FAILED


def _runs(args: argparse.Namespace) -> int:
    query = {"limit": str(args.limit)}
    if args.status:
        query["status"] = args.status
    answer = call(args, "GET", "/admin/pricing/sync/runs?" + urllib.parse.urlencode(query))
    if (code := _refused(answer)) is not None:
        return code
    _emit(args, answer.body, _run_table(answer.body["runs"]))
    return EXIT_OK


def _release(args: argparse.Namespace) -> int:
    answer = call(args, "DELETE", "/admin/pricing/sync/lock", {"reason": args.reason})
    if (code := _refused(answer)) is not None:
        return code
    holder = answer.body["holder"]
    text = (
        f"released: was {holder['owner']} run {holder['run_id']} (fence {holder['fence']})"
        if holder
        else "nothing to release: the lock was free"
    )
    _emit(args, answer.body, text)
    return EXIT_OK


def _run_table(runs: list[dict[str, Any]]) -> str:
    header = f"{'run id':<38}{'status':<12}{'fence':>6}  {'trigger':<10}{'started':<27}{'s':>7}"
    lines = [header]
    for run in runs:
        counts = run["counts"]
        lines.append(
            f"{run['id']:<38}{run['status']:<12}{run['fence']:>6}  {run['trigger']:<10}"
            f"{run['started_at'][:26]:<27}{run['duration_s'] or 0:>7.2f}"
            f"  +{counts['added']} ~{counts['changed']} -{counts['deactivated']}"
        )
    return "\n".join(lines)
