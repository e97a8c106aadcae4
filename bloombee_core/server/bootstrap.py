"""A bootstrap node: a DHT peer that others join through; it hosts no blocks."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

from bloombee_core.registry import PluginSet
from bloombee_core.settings import BootstrapJob
from bloombee_core.swarm.aio import LoopThread


def run_bootstrap(
    job: BootstrapJob, plugins: PluginSet, announce_ready: Callable[[dict[str, Any]], None]
) -> int:
    """Run a bootstrap node until SIGTERM / SIGINT; ``announce_ready`` gets its peer id and addresses."""
    network = job.network
    transport = plugins.create("transports", network.transport, "network.transport")
    loop = LoopThread("bloombee-bootstrap")
    try:
        identity = str(network.identity) if network.identity else None
        loop.run(transport.start(listen=network.listen, identity=identity))
        announce_ready({"peer": transport.peer_id, "addrs": loop.run(transport.addresses())})
        wait_for_signal()
    finally:
        try:
            loop.run(transport.shutdown(), timeout=15)
        finally:
            loop.stop()
    return 0


def wait_for_signal() -> None:
    """Block until SIGTERM or SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    while not stop.wait(0.5):
        pass
