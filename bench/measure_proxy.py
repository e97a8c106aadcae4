"""Measure what the WAN proxy really adds: round-trip latency and throughput, against what was asked.

    python -m bench.measure_proxy [--settings 0:0 20:100 50:20] [--bytes 2000000] [--repeats 20]

Each setting is DELAY_MS:MBIT (MBIT 0 = no cap). For each, a small echo's round trip through the
proxy is compared with the same echo direct (added = proxied - direct, expected 2 x delay), and a
one-way bulk transfer's goodput with the cap (expected transfer time: bytes / cap + 2 x delay, the
second delay being the one-byte acknowledgement's way back).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time

from bench.wanproxy import WanProxy


class EchoServer:
    """Echoes every message, or with ``ack_after`` bytes, answers one byte per ``ack_after`` received."""

    def __init__(self, ack_after: int | None = None) -> None:
        self.ack_after = ack_after
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        received = 0
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(1 << 16):
                if self.ack_after is None:
                    conn.sendall(data)
                    continue
                received += len(data)
                if received >= self.ack_after:
                    conn.sendall(b"!")
                    received = 0

    def close(self) -> None:
        self.sock.close()


def _recv_exactly(conn: socket.socket, n: int) -> None:
    while n > 0:
        chunk = conn.recv(n)
        if not chunk:
            raise ConnectionError("connection closed early")
        n -= len(chunk)


def round_trips(port: int, size: int, repeats: int) -> list[float]:
    message = bytes(size)
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(repeats + 1):
            started = time.perf_counter()
            conn.sendall(message)
            _recv_exactly(conn, size)
            times.append(time.perf_counter() - started)
    return times[1:]  # the first one includes connection set-up


def bulk_seconds(port: int, nbytes: int) -> float:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        started = time.perf_counter()
        conn.sendall(bytes(nbytes))
        _recv_exactly(conn, 1)
        return time.perf_counter() - started


def _setting(text: str) -> tuple[float, float]:
    delay, _, mbit = text.partition(":")
    return float(delay), float(mbit or 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", type=_setting, default=[(0, 0), (20, 100), (50, 20)])
    parser.add_argument("--bytes", type=int, default=2_000_000, help="bulk transfer size")
    parser.add_argument("--message", type=int, default=1152, help="echo size (a 576-wide bf16 hidden state)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    echo, sink = EchoServer(None), EchoServer(args.bytes)
    direct_rtt = statistics.median(round_trips(echo.port, args.message, args.repeats))
    direct_bulk = statistics.median(bulk_seconds(sink.port, args.bytes) for _ in range(3))
    print(
        f"direct loopback: echo {direct_rtt * 1e3:.3f} ms, bulk {args.bytes * 8 / direct_bulk / 1e6:.0f} Mbit/s"
    )
    header = (
        f"{'delay':>7} {'cap':>9} | {'RTT added':>10} {'expected':>9} {'p90':>8} | "
        f"{'goodput':>13} {'cap':>9} {'transfer':>9} {'expected':>9}"
    )
    print(header)
    print("-" * len(header))
    for delay_ms, mbit in args.settings:
        with WanProxy(0, ("127.0.0.1", echo.port), delay_ms, mbit) as proxy:
            times = sorted(round_trips(proxy.port, args.message, args.repeats))
        with WanProxy(0, ("127.0.0.1", sink.port), delay_ms, mbit) as proxy:
            bulk = statistics.median(bulk_seconds(proxy.port, args.bytes) for _ in range(3))
        added = statistics.median(times) - direct_rtt
        p90 = times[int(0.9 * (len(times) - 1))] - direct_rtt
        serialization = 2 * args.message * 8 / (mbit * 1e6) if mbit else 0.0
        expected_rtt = 2 * delay_ms / 1e3 + serialization
        expected_bulk = (args.bytes * 8 / (mbit * 1e6) if mbit else direct_bulk) + 2 * delay_ms / 1e3
        goodput = args.bytes * 8 / max(bulk - 2 * delay_ms / 1e3, 1e-9) / 1e6
        cap = f"{mbit:g} Mbit" if mbit else "none"
        print(
            f"{delay_ms:>5g}ms {cap:>9} | {added * 1e3:>8.2f}ms {expected_rtt * 1e3:>7.2f}ms {p90 * 1e3:>6.2f}ms | "
            f"{goodput:>8.1f} Mbit {cap:>9} {bulk * 1e3:>7.0f}ms {expected_bulk * 1e3:>7.0f}ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
