"""What one hop costs below the model: echo round trips over plain TCP and over libp2p, direct and via the proxy.

    python -m bench.hop                 # hidden state of the tiny LLaMA (256 × fp32 = 1 KiB)
    python -m bench.hop --bytes 2304    # SmolLM2's (576 × fp32)

Rows (median round trip over ``--rounds`` echoes, after a warm-up):

* ``tcp direct``      asyncio TCP echo on loopback: the operating system's share;
* ``tcp via proxy``   the same through a 0 ms WAN proxy (in its own process, as in the benchmarks): what
  the emulation itself adds per crossing;
* ``tcp via 20ms proxy, minus 40 ms``  the same with 20 ms each way, less the 40 ms asked for: the proxy's
  timer slack (it sleeps until each piece is due; on a loaded machine wake-ups come late);
* ``p2p frames``      a libp2p stream through two p2pd daemons (the hivemind transport), raw frames;
* ``p2p wire msgs``   the same with the swarm's wire format (msgpack header + tensor payload) both ways;
* ``p2p via proxy``   wire messages with the server's p2pd behind the 0 ms proxy.

Half a round trip is the per-hop cost of that layer; a decode step crosses N+1 hops.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time

import torch

PROTOCOL = "/bloombee/bench/echo"


async def _tcp_echo_server() -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            writer.write(data)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _tcp_rounds(port: int, payload: bytes, rounds: int) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        writer.write(payload)
        await reader.readexactly(len(payload))
        times.append(time.perf_counter() - t)
    writer.close()
    return times


def _start_proxy(target_port: int, delay_ms: float = 0.0) -> tuple[subprocess.Popen, int]:
    from bench.swarm import free_port

    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "bench.proxyhost",
        "--delay-ms",
        f"{delay_ms:g}",
        f"{port}:127.0.0.1:{target_port}",
    ]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    line = proc.stdout.readline().decode() if proc.stdout else ""
    if "ready" not in line:
        proc.kill()
        raise RuntimeError(f"the proxy did not start (printed {line!r})")
    return proc, port


async def _p2p_rows(payload_bytes: int, rounds: int) -> dict[str, list[float]]:
    from bloombee_hivemind.transport import HivemindTransport

    from bench.swarm import free_port
    from bloombee_core.swarm import wire

    hidden = torch.randn(1, 1, payload_bytes // 4)
    position_ids = torch.zeros(1, 1, dtype=torch.long)
    listen_port = free_port()
    proxy, proxy_port = _start_proxy(listen_port)
    server, direct_client, proxied_client = HivemindTransport(), HivemindTransport(), HivemindTransport()
    rows: dict[str, list[float]] = {}
    try:
        await server.start(listen=[f"/ip4/127.0.0.1/tcp/{listen_port}"])
        bootstrap = await server.addresses()

        async def echo(stream) -> None:
            while (message := await wire.read_header(stream)) is not None:
                header, metas = message
                tensors = await wire.read_tensors(stream, metas, wire.compressor_table(), 1 << 24)
                await wire.send(stream, {"ok": True}, tensors)

        async def frames(stream) -> None:
            while (frame := await stream.read_frame(1 << 24)) is not None:
                await stream.write_frame(frame)

        await server.serve(PROTOCOL + "/frames", frames)
        await server.serve(PROTOCOL + "/wire", echo)
        await direct_client.start(initial_peers=bootstrap, client_mode=True)
        proxied_addr = [f"/ip4/127.0.0.1/tcp/{proxy_port}/p2p/{server.peer_id}"]
        await proxied_client.start(initial_peers=proxied_addr, client_mode=True)

        stream = await direct_client.connect(server.peer_id, PROTOCOL + "/frames")
        data = hidden.numpy().tobytes()
        rows["p2p frames"] = []
        for i in range(rounds + 20):
            t = time.perf_counter()
            await stream.write_frame(data)
            await stream.read_frame(1 << 24)
            if i >= 20:
                rows["p2p frames"].append(time.perf_counter() - t)
        stream.close()
        for label, client in (("p2p wire msgs", direct_client), ("p2p via proxy", proxied_client)):
            stream = await client.connect(server.peer_id, PROTOCOL + "/wire")
            rows[label] = []
            for i in range(rounds + 20):
                t = time.perf_counter()
                await wire.send(
                    stream, {"type": "step", "step": i}, {"hidden": hidden, "position_ids": position_ids}
                )
                head, metas = await wire.read_header(stream)
                await wire.read_tensors(stream, metas, wire.compressor_table(), 1 << 24)
                if i >= 20:
                    rows[label].append(time.perf_counter() - t)
            stream.close()
    finally:
        for transport in (proxied_client, direct_client, server):
            try:
                await transport.shutdown()
            except Exception:  # noqa: BLE001 - a half-started transport
                pass
        proxy.terminate()
        proxy.wait(10)
    return rows


async def _measure(payload_bytes: int, rounds: int) -> dict[str, list[float]]:
    payload = b"x" * payload_bytes
    server, port = await _tcp_echo_server()
    rows = {"tcp direct": (await _tcp_rounds(port, payload, rounds + 20))[20:]}
    proxy, proxy_port = _start_proxy(port)
    try:
        rows["tcp via proxy"] = (await _tcp_rounds(proxy_port, payload, rounds + 20))[20:]
    finally:
        proxy.terminate()
        proxy.wait(10)
    # With a delay the proxy sleeps until each piece is due: what it adds beyond 2 × delay is its timer slack.
    proxy, proxy_port = _start_proxy(port, 20.0)
    try:
        rows["tcp via 20ms proxy, minus 40 ms"] = [
            t - 0.040 for t in (await _tcp_rounds(proxy_port, payload, rounds // 10 + 5))[5:]
        ]
    finally:
        proxy.terminate()
        proxy.wait(10)
    server.close()
    rows.update(await _p2p_rows(payload_bytes, rounds))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hop", description=__doc__.splitlines()[0])
    p.add_argument("--bytes", type=int, default=1024, help="payload per message (a hidden state)")
    p.add_argument("--rounds", type=int, default=300)
    args = p.parse_args(argv)
    rows = asyncio.run(_measure(args.bytes, args.rounds))
    print(f"echo of {args.bytes} bytes, median of {args.rounds} round trips (half = one hop):")
    for label, times in rows.items():
        rtt = statistics.median(times) * 1000
        print(f"  {label:<31} round trip {rtt:6.3f} ms   one way {rtt / 2:6.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
