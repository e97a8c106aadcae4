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
``bad_request``) fails at once: another server would refuse it too. Anything else that comes from the
network or a server (unreachable peer, broken stream, malformed reply, timeout, a server that is busy
or failed internally) bans that server for a while and tries again, after ``min(0.1 * 2**attempt, 5)``
seconds, ``max_retries`` times at most.
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


def retryable(exc: BaseException) -> bool:
    """Whether another attempt (on another server) may succeed where this one raised ``exc``."""
    return isinstance(exc, RETRYABLE) or (isinstance(exc, RemoteError) and exc.code != "bad_request")


def backoff_delay(attempt: int) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
    return min(0.1 * 2**attempt, 5.0)


class Retries:
    """The attempts of one call: at most ``max_retries`` retries; ``ban(peer, exc)`` takes a failing
    server out of routing for a while."""

    def __init__(self, max_retries: int, ban: Callable[[str, BaseException], None]) -> None:
        self.max_retries, self.ban = max_retries, ban
        self.attempt = 0  # failed attempts so far

    async def failed(self, exc: Exception, peer: str | None, doing: str = "a request") -> None:
        """An attempt raised ``exc``: re-raise it if it is final, else ban ``peer`` (when the failure is
        that server's) and wait before the next attempt."""
        if not retryable(exc) or self.attempt >= self.max_retries:
            raise exc
        if peer is not None:
            self.ban(peer, exc)
        else:
            logger.warning("%s failed (%s); retrying", doing, exc)
        await asyncio.sleep(backoff_delay(self.attempt))
        self.attempt += 1

    async def run(self, attempt: Callable[[], Awaitable[T]], doing: str) -> T:
        """``attempt()`` until it succeeds, for a call whose failures ban their servers themselves."""
        while True:
            try:
                return await attempt()
            except Exception as exc:
                await self.failed(exc, None, doing)
