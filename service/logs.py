"""structlog set-up: JSON lines off a TTY, readable console lines on one."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog
import structlog.tracebacks

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _Sink:
    """Where log lines go. Loggers are cached on first use, so the stream is
    swapped here rather than by reconfiguring (tests capture output this way)."""

    def __init__(self) -> None:
        self.target: TextIO = sys.stderr

    def write(self, text: str) -> None:
        self.target.write(text)

    def flush(self) -> None:
        self.target.flush()


_SINK = _Sink()


def redirect(stream: TextIO) -> TextIO:
    """Send log lines to ``stream`` from now on; returns the previous stream."""
    previous, _SINK.target = _SINK.target, stream
    return previous


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    _SINK.target = stream
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(
            colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # Never show_locals: frame locals held admin tokens and backend URLs.
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
            if as_json
            else structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=_SINK),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    # aiohttp and asyncio speak through the standard library: keep their warnings.
    logging.basicConfig(level=logging.WARNING, stream=stream, format="%(name)s: %(message)s")
