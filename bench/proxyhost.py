"""Run several WAN proxies (bench/wanproxy.py) in one child process, one per server link.

The proxies live outside the benchmark's process so their byte shuffling never competes with the
client for the GIL. Usage::

    python -m bench.proxyhost --delay-ms 20 --mbit 100 41001:127.0.0.1:42001 41002:127.0.0.1:42002

prints ``ready`` once every proxy listens, then runs until stdin closes or it gets SIGTERM. On SIGUSR1
it prints one line per proxy with the bytes it has carried so far in each direction
(``bytes PORT up=N down=N``; up = towards the server), so a profile can count what a step sends.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def _pair(text: str) -> tuple[int, str]:
    listen, _, target = text.partition(":")
    if not listen.isdigit() or ":" not in target:
        raise argparse.ArgumentTypeError(f"expected LISTEN_PORT:HOST:PORT, got {text!r}")
    return int(listen), target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay added in each direction")
    parser.add_argument(
        "--mbit", type=float, default=None, help="bandwidth cap per direction (default: none)"
    )
    parser.add_argument("pairs", nargs="+", type=_pair, help="LISTEN_PORT:HOST:PORT, one per proxied server")
    args = parser.parse_args(argv)

    from bench.wanproxy import WanProxy

    proxies: dict[int, WanProxy] = {}
    for listen, target in args.pairs:
        proxy = WanProxy(listen, target, args.delay_ms, args.mbit)
        proxy.start()
        proxies[listen] = proxy
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(
        signal.SIGUSR1,
        lambda *_: print(
            "\n".join(f"bytes {port} up={p.bytes_up} down={p.bytes_down}" for port, p in proxies.items()),
            flush=True,
        ),
    )
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print("ready", flush=True)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    for proxy in proxies.values():
        proxy.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
