"""The WAN proxy adds the one-way delay it was asked for and holds throughput under its cap."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.measure_proxy import EchoServer
from bench.wanproxy import WanProxy

ROOT = Path(__file__).resolve().parents[1]
DELAY_MS = 25.0


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


def recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        assert chunk, "the proxy closed the connection early"
        data += chunk
    return data


def round_trip_seconds(port: int, message: bytes, repeats: int = 5) -> list[float]:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            conn.sendall(message)
            assert recv_exactly(conn, len(message)) == message
            times.append(time.perf_counter() - started)
    return times


def test_round_trip_costs_two_one_way_delays(echo: EchoServer) -> None:
    with WanProxy(0, f"127.0.0.1:{echo.port}", delay_ms=DELAY_MS, mbit=100) as proxy:
        times = round_trip_seconds(proxy.port, b"hello through the wan")
    assert min(times) >= 2 * DELAY_MS / 1000
    # Loose upper bound: the proxy must not add whole extra delays (a noisy machine adds a little).
    assert sorted(times)[len(times) // 2] < 2 * DELAY_MS / 1000 + 0.25


def test_without_delay_the_proxy_forwards_faithfully(echo: EchoServer) -> None:
    payload = bytes(range(256)) * 4000  # 1 MB, order-sensitive content
    with (
        WanProxy(0, ("127.0.0.1", echo.port)) as proxy,
        socket.create_connection(("127.0.0.1", proxy.port)) as conn,
    ):
        sender = threading.Thread(target=conn.sendall, args=(payload,))
        sender.start()
        assert recv_exactly(conn, len(payload)) == payload
        sender.join()
        assert proxy.bytes_up == proxy.bytes_down == len(payload)


def test_bulk_throughput_stays_under_the_cap() -> None:
    mbit, size = 20.0, 1_000_000  # 0.4 s at the cap
    sink = EchoServer(ack_after=size)
    try:
        with WanProxy(0, f"127.0.0.1:{sink.port}", delay_ms=DELAY_MS, mbit=mbit) as proxy:
            with socket.create_connection(("127.0.0.1", proxy.port)) as conn:
                started = time.perf_counter()
                conn.sendall(bytes(size))
                assert recv_exactly(conn, 1) == b"!"
                elapsed = time.perf_counter() - started
    finally:
        sink.close()
    # Physics: serialising the bytes at the cap, then the delay there and back.
    floor = size * 8 / (mbit * 1e6) + 2 * DELAY_MS / 1000
    assert elapsed >= 0.95 * floor
    assert elapsed < 5 * floor  # the cap holds throughput down, not to a crawl


def test_two_connections_share_the_link() -> None:
    mbit, size = 20.0, 500_000
    sink = EchoServer(ack_after=size)
    elapsed: list[float] = []

    def send(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as conn:
            started = time.perf_counter()
            conn.sendall(bytes(size))
            assert recv_exactly(conn, 1) == b"!"
            elapsed.append(time.perf_counter() - started)

    try:
        with WanProxy(0, f"127.0.0.1:{sink.port}", mbit=mbit) as proxy:
            senders = [threading.Thread(target=send, args=(proxy.port,)) for _ in range(2)]
            for sender in senders:
                sender.start()
            for sender in senders:
                sender.join()
    finally:
        sink.close()
    # Together they moved 2 * size bytes over one capped link: the later one finished after all of it.
    assert len(elapsed) == 2 and max(elapsed) >= 0.95 * 2 * size * 8 / (mbit * 1e6)


def test_unreachable_target_closes_the_client_connection() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]  # bound, never listening: connections are refused
        with WanProxy(0, f"127.0.0.1:{dead_port}", delay_ms=5) as proxy:
            with socket.create_connection(("127.0.0.1", proxy.port)) as conn:
                conn.settimeout(10)
                assert conn.recv(1) == b""


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        WanProxy(0, "localhost")
    with pytest.raises(ValueError, match=">= 0"):
        WanProxy(0, "127.0.0.1:1", delay_ms=-1)


def test_command_line_proxy(echo: EchoServer) -> None:
    command = [sys.executable, "-m", "bench.wanproxy", "--listen", "0", "--target", f"127.0.0.1:{echo.port}"]
    with subprocess.Popen(
        [*command, "--delay-ms", str(DELAY_MS), "--mbit", "100"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith("listening on 127.0.0.1:"), line
            port = int(line.split()[2].rsplit(":", 1)[1])
            assert min(round_trip_seconds(port, b"ping", repeats=3)) >= 2 * DELAY_MS / 1000
        finally:
            process.terminate()
            _, errors = process.communicate(timeout=10)
    assert process.returncode == 0 and not errors, errors


def test_stop_closes_open_connections_quietly(echo: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    proxy = WanProxy(0, f"127.0.0.1:{echo.port}", delay_ms=5).start()
    with socket.create_connection(("127.0.0.1", proxy.port)) as conn:
        conn.sendall(b"x")
        assert recv_exactly(conn, 1) == b"x"
        proxy.stop()
        conn.settimeout(10)
        assert conn.recv(1) == b""
    assert not [record for record in caplog.records if record.name == "asyncio"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
