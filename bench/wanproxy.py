"""A userspace TCP proxy that makes loopback behave like a WAN link: one-way delay plus a bandwidth cap.

``tc netem`` is not available here, so each benchmark server sits behind one of these. Every byte
crossing the proxy, in either direction, first waits for the link (serialization at ``mbit``
megabits per second, shared by all connections through the proxy, as one access link is) and then
travels for ``delay_ms`` before it is written out. Order is preserved; a sender that outruns the link
is slowed by ordinary TCP back-pressure once the link's queue holds ``queue_ms`` worth of bytes.
Connection set-up (the TCP handshake) is not delayed; everything sent over the connection is.

Library::

    with WanProxy(0, "127.0.0.1:1234", delay_ms=20, mbit=100) as proxy:
        connect_to(proxy.port)

Command line (prints ``listening on HOST:PORT`` once ready, runs until SIGINT/SIGTERM)::

    python -m bench.wanproxy --listen 0 --target 127.0.0.1:1234 --delay-ms 20 --mbit 100
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Coroutine
from types import TracebackType
from typing import Any

# Data moves in pieces of at most this size; a piece is delivered when its last byte has crossed
# the link, so the piece adds at most 16 KiB / bandwidth (1.3 ms at 100 Mbit/s) of extra burstiness.
PIECE_BYTES = 16 * 1024
# Pieces read but not yet delivered, per direction: bounds memory when the bandwidth is unlimited.
MAX_PIECES_IN_FLIGHT = 256
EPOLL_RESOLUTION_S = 0.001


class Link:
    """One direction of a link: when does a piece that is ready now finish crossing it."""

    def __init__(self, mbit: float | None, queue_s: float) -> None:
        self.bytes_per_s = mbit * 1e6 / 8 if mbit else None
        self.queue_s = queue_s
        self.free_at = 0.0  # loop time at which the link has sent everything it accepted
        self.carried_bytes = 0  # everything booked on the link so far

    def backlog(self, now: float) -> float:
        """Seconds of data the link still has to send."""
        return max(0.0, self.free_at - now)

    def reserve(self, nbytes: int, now: float) -> float:
        """Book ``nbytes`` on the link; returns the time its last byte has been sent."""
        self.carried_bytes += nbytes
        if self.bytes_per_s is None:
            return now
        self.free_at = max(now, self.free_at) + nbytes / self.bytes_per_s
        return self.free_at


async def _sleep_until(loop: asyncio.AbstractEventLoop, due: float) -> None:
    """Wait until loop time ``due`` to within about 0.1 ms.

    The event loop's timers go through epoll, which rounds timeouts up to whole milliseconds: a
    plain ``asyncio.sleep`` would deliver up to 1 ms late (in practice just under 1 ms, every time,
    since delays are whole milliseconds plus a little serialization). So the loop sleeps until
    the last millisecond and the thread sleeps the rest: this proxy's other work waits at most that
    long (a read is stamped up to 1 ms late), a smaller error than 1 ms on every delivery.
    """
    coarse = due - loop.time() - EPOLL_RESOLUTION_S
    if coarse > 0:
        await asyncio.sleep(coarse)
    rest = due - loop.time()
    if rest > 0:
        time.sleep(rest)


def parse_target(target: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(target, tuple):
        return target
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"target must be HOST:PORT, got {target!r}")
    return host, int(port)


class WanProxy:
    """Forwards ``listen_host:listen_port`` to ``target`` through an emulated link; runs in its own thread.

    :param listen_port: port to listen on; 0 picks a free one (see :attr:`port` after :meth:`start`).
    :param target: ``"HOST:PORT"`` or ``(host, port)`` of the real server.
    :param delay_ms: one-way delay added in each direction.
    :param mbit: bandwidth cap per direction in megabits per second; None or 0 for no cap.
    :param queue_ms: how much queued data (in time at the capped rate) the link buffers before the
        sender feels back-pressure.
    """

    def __init__(
        self,
        listen_port: int,
        target: str | tuple[str, int],
        delay_ms: float = 0.0,
        mbit: float | None = None,
        *,
        listen_host: str = "127.0.0.1",
        queue_ms: float = 50.0,
    ) -> None:
        if delay_ms < 0 or (mbit is not None and mbit < 0) or queue_ms < 0:
            raise ValueError(f"delay_ms, mbit and queue_ms must be >= 0, got {delay_ms}, {mbit}, {queue_ms}")
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.target = parse_target(target)
        self.delay_s = delay_ms / 1000
        self.mbit = mbit or None
        self.queue_s = queue_ms / 1000
        self.port: int | None = None
        self._uplink = Link(self.mbit, self.queue_s)  # client -> target
        self._downlink = Link(self.mbit, self.queue_s)  # target -> client
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> WanProxy:
        """Start listening (returns once the port is bound; raises if it cannot be)."""
        if self._thread is not None:
            raise RuntimeError("this proxy is already started")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"wanproxy:{self.listen_port}")
        self._thread.daemon = True
        self._thread.start()
        try:
            self._call(self._listen())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Close the listener and every proxied connection, then end the thread."""
        if self._loop is None or self._thread is None:
            return
        if self._loop.is_running():
            with contextlib.suppress(Exception):
                self._call(self._shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> WanProxy:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        if self.port is None:
            raise RuntimeError("start the proxy first")
        return self.listen_host, self.port

    @property
    def bytes_up(self) -> int:
        """Bytes carried so far from clients to the target (all connections)."""
        return self._uplink.carried_bytes

    @property
    def bytes_down(self) -> int:
        """Bytes carried so far from the target back to clients (all connections)."""
        return self._downlink.carried_bytes

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.listen_host, self.listen_port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    # ---- forwarding -----------------------------------------------------------------------------
    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        upstream_writer = None
        pumps: list[asyncio.Task[None]] = []
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
            pumps = [
                asyncio.create_task(self._pump(client_reader, upstream_writer, self._uplink)),
                asyncio.create_task(self._pump(upstream_reader, client_writer, self._downlink)),
            ]
            # Both directions end on their own (half-close); a failure in either ends the connection.
            pending = set(pumps)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(pump.cancelled() or pump.exception() for pump in done):
                    break
        except OSError:
            pass  # the target refused: closing the client's connection tells it
        except asyncio.CancelledError:
            pass  # stop(): end quietly (asyncio's stream callback logs a handler that ends cancelled)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._connections.discard(task)
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link) -> None:
        """Read from one side, hold each piece for link + delay, write it to the other side."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(MAX_PIECES_IN_FLIGHT)
        pump = asyncio.current_task()
        assert pump is not None
        deliver = asyncio.create_task(self._deliver(pieces, writer, pump))
        try:
            while data := await reader.read(PIECE_BYTES):
                # A full link queue stops reading, so TCP slows the sender as a real bottleneck would.
                excess = link.backlog(loop.time()) - link.queue_s
                if excess > 0:
                    await asyncio.sleep(excess)
                sent_at = link.reserve(len(data), loop.time())
                await pieces.put((sent_at + self.delay_s, data))
            await pieces.put((0.0, b""))  # end of stream, in order behind the data
            await deliver
        except BaseException:
            deliver.cancel()
            if deliver.done() and not deliver.cancelled():
                deliver.exception()  # retrieved here, so asyncio does not log it as lost
            raise

    async def _deliver(
        self,
        pieces: asyncio.Queue[tuple[float, bytes]],
        writer: asyncio.StreamWriter,
        pump: asyncio.Task[None],
    ) -> None:
        try:
            await self._deliver_pieces(pieces, writer)
        except Exception:
            pump.cancel()  # the pump may be blocked on a full queue that nobody will empty
            raise

    async def _deliver_pieces(
        self, pieces: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await pieces.get()
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()  # half-close: the other direction may still be talking
                return
            await _sleep_until(loop, due)
            writer.write(data)
            await writer.drain()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TCP proxy adding a one-way delay and a bandwidth cap.")
    parser.add_argument("--listen", type=int, default=0, help="port to listen on (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per direction")
    parser.add_argument(
        "--mbit", type=float, default=None, help="bandwidth cap per direction (default: none)"
    )
    parser.add_argument("--queue-ms", type=float, default=50.0, help="link buffer before back-pressure")
    args = parser.parse_args(argv)
    try:
        target = parse_target(args.target)
    except ValueError as error:
        parser.error(str(error))
    proxy = WanProxy(
        args.listen, target, args.delay_ms, args.mbit, listen_host=args.host, queue_ms=args.queue_ms
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with proxy:
        cap = f"{args.mbit:g} Mbit/s" if args.mbit else "no bandwidth cap"
        print(
            f"listening on {args.host}:{proxy.port} -> {args.target} ({args.delay_ms:g} ms one-way, {cap})",
            flush=True,
        )
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
