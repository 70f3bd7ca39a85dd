"""What the lock-case tests (tests/test_lock_cases_*.py) share.

The admin routes they call, a bounded poll, and a TCP proxy on 127.0.0.1 that can
slow a server's replies, or cut every connection to it (a partition) and later
restore it on the same port. Each case's own fixtures stay with its tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

TRIGGER = "/admin/pricing/scheduler/trigger"
STATUS = "/admin/pricing/scheduler/status"
RUNS = "/admin/pricing/sync/runs"
LOCK = "/admin/pricing/sync/lock"


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float) -> bool:
    """Poll ``check`` every 20 ms until it is true or ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    for _ in range(max(1, round(timeout_s / 0.02))):
        if await check():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return await check()


class LoopbackProxy:
    """A TCP proxy on 127.0.0.1 in front of a local server.

    ``delay_s`` holds back every chunk the server sends: a slow server. ``cut()``
    drops every connection and refuses new ones until ``restore()``: a partition,
    in which the server keeps its data but no command reaches it.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay_s = 0.0
        self.port = 0
        self.open_connections = 0
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for transport in list(self._transports):
            transport.abort()
        if server is not None:
            await server.wait_closed()

    async def restore(self) -> None:
        await self.start()  # the same port again

    async def close(self) -> None:
        await self.cut()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port
            )
        except OSError:
            writer.close()
            return
        sides = {writer.transport, server_writer.transport}
        pumps = {
            asyncio.create_task(self._pump(reader, server_writer, delayed=False)),
            asyncio.create_task(self._pump(server_reader, writer, delayed=True)),
        }
        self._transports |= sides
        self._pumps |= pumps
        self.open_connections += 1
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            writer.close()
            server_writer.close()
            self._transports -= sides
            self._pumps -= pumps
            self.open_connections -= 1

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, delayed: bool
    ) -> None:
        # Ends at end of stream, on a socket error, or when close() cancels it.
        try:
            while chunk := await reader.read(65_536):
                if delayed and self.delay_s:
                    await asyncio.sleep(self.delay_s)
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
