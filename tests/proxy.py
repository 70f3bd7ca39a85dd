"""A loopback TCP proxy that can slow, black-hole or reset the traffic it carries,
to put a flaky network between synclock and Redis."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit


class FlakyProxy:
    def __init__(self, target_url: str) -> None:
        parts = urlsplit(target_url)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self.path = parts.path or "/0"
        self._flowing = asyncio.Event()
        self.mode = "pass"  # "pass", "slow", "blackhole", "reset"
        self.delay_s = 0.0
        self.server: asyncio.Server | None = None
        self.port = 0
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = value
        if value == "blackhole":
            self._flowing.clear()  # bytes wait here until the mode changes
        else:
            self._flowing.set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}{self.path}"

    async def start(self) -> FlakyProxy:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.cut_all()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    def cut_all(self) -> None:
        """Drop every open connection, as a middlebox reset would."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "reset":
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update({writer, up_writer})
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await src.read(65536):
                if self.mode == "reset":
                    dst.transport.abort()
                    return
                await self._flowing.wait()
                if self.mode == "slow":
                    await asyncio.sleep(self.delay_s)
                dst.write(data)
                await dst.drain()
        dst.close()
