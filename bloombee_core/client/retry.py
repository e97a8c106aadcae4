"""The client's one retry policy: what a failed call may retry, how long it waits, when it gives up.

Every call the client makes to servers (stateless forward and backward, session steps, opening and
rebuilding sessions) counts its attempts with a :class:`Retries`:

.. code-block:: python

    retries = swarm.retries()
    while not done:
        hop = ...
        try:
            ...  # one attempt on hop.peer
        except Exception as exc:
            await retries.failed(exc, hop.peer)  # re-raises, or bans hop.peer and backs off
            continue

A refusal of the request itself (a :class:`~bloombee_core.client.rpc.RemoteError` with code
``bad_request``) fails at once: another server would refuse it too. A server that is **busy** (full of
sessions or of KV cache) is not at fault: it is set aside for :data:`BUSY_PAUSE` seconds only (routing
tries another server for the same blocks meanwhile, or comes back to it), and the call waits longer
between attempts, ``min(0.5 * 2**attempt, 8)`` seconds; when the attempts run out it fails with
:class:`SwarmBusyError`, which says so. Anything else that comes from the network or a server
(unreachable peer, broken stream, malformed reply, timeout, an internal error) bans that server for a
while and tries again, after ``min(0.1 * 2**attempt, 5)`` seconds, ``max_retries`` times at most.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from bloombee_core.client.rpc import RemoteError
from bloombee_core.swarm.wire import ProtocolError
from bloombee_core.transport import TransportError

logger = logging.getLogger(__name__)
T = TypeVar("T")

RETRYABLE = (TransportError, ProtocolError, TimeoutError, ConnectionError)
BUSY_PAUSE = 1.0  # seconds a busy server is left out of routing


class SwarmBusyError(RemoteError):
    """Every attempt found the servers it needed busy: the swarm is full now, not broken."""

    def __init__(self, cause: RemoteError, attempts: int) -> None:
        RuntimeError.__init__(
            self,
            f"the swarm is busy: {attempts} attempts found no free server for these blocks "
            f"(last: {cause}); try again later",
        )
        self.peer, self.code = cause.peer, "busy"


def is_busy(exc: BaseException) -> bool:
    return isinstance(exc, RemoteError) and exc.code == "busy"


def retryable(exc: BaseException) -> bool:
    """Whether another attempt (on another server) may succeed where this one raised ``exc``."""
    return isinstance(exc, RETRYABLE) or (isinstance(exc, RemoteError) and exc.code != "bad_request")


def backoff_delay(attempt: int, busy: bool = False) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (0-based); longer when it was busy."""
    return min(0.5 * 2**attempt, 8.0) if busy else min(0.1 * 2**attempt, 5.0)


class Retries:
    """The attempts of one call: at most ``max_retries`` retries; ``ban(peer, exc)`` takes a failing
    server out of routing for a while."""

    def __init__(self, max_retries: int, ban: Callable[[str, BaseException], None]) -> None:
        self.max_retries, self.ban = max_retries, ban
        self.attempt = 0  # failed attempts so far

    async def failed(self, exc: Exception, peer: str | None, doing: str = "a request") -> None:
        """An attempt raised ``exc``: re-raise it if it is final, else ban ``peer`` (when the failure is
        that server's; briefly when it is busy) and wait before the next attempt."""
        busy = is_busy(exc)
        if not retryable(exc) or self.attempt >= self.max_retries:
            if busy and not isinstance(exc, SwarmBusyError):
                raise SwarmBusyError(exc, self.attempt + 1) from exc  # type: ignore[arg-type]
            raise exc
        if peer is not None:
            self.ban(peer, exc)
        else:
            logger.warning("%s failed (%s); retrying", doing, exc)
        await asyncio.sleep(backoff_delay(self.attempt, busy))
        self.attempt += 1

    async def run(self, attempt: Callable[[], Awaitable[T]], doing: str) -> T:
        """``attempt()`` until it succeeds, for a call whose failures ban their servers themselves."""
        while True:
            try:
                return await attempt()
            except Exception as exc:
                await self.failed(exc, None, doing)
