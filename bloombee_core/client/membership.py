"""A client's membership of the swarm: its started transport and the event loop that drives it.

Leaving stops the transport (for hivemind: this client's DHT process and its ``p2pd``). A membership
still open when the interpreter exits is closed then, silently, so a script that never closes its
models leaves no process behind and prints nothing.
"""

from __future__ import annotations

import atexit
from collections.abc import Sequence

from bloombee_core.swarm.aio import LoopThread
from bloombee_core.transport import Transport


class SwarmMembership:
    """Owns a client's transport and event loop; closing twice is harmless."""

    def __init__(self, transport: Transport, loop: LoopThread) -> None:
        self.transport, self.loop, self.closed = transport, loop, False
        atexit.register(self.close)

    @classmethod
    def join(cls, transport: Transport, initial_peers: Sequence[str]) -> SwarmMembership:
        """Start ``transport`` as a client of the swarm that ``initial_peers`` belong to."""
        loop = LoopThread("bloombee-client")
        try:
            loop.run(transport.start(initial_peers=list(initial_peers), client_mode=True))
        except BaseException:
            loop.stop()
            raise
        return cls(transport, loop)

    def close(self) -> None:
        """Leave the swarm."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        try:
            self.loop.run(self.transport.shutdown(), timeout=20)
        finally:
            self.loop.stop()
