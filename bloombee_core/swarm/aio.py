"""A private asyncio event loop in a background thread, so synchronous code (torch, transformers
generate, the CLI) can drive the asynchronous transport."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str = "bloombee-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (from any other thread)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("LoopThread.run called from its own loop; await the coroutine instead")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def soon(self, fn: Callable[[], object]) -> None:
        """``fn()`` on the loop's thread (streams are not thread-safe), without waiting for it."""
        if threading.current_thread() is self._thread or not self.loop.is_running():
            fn()
        else:
            self.loop.call_soon_threadsafe(fn)

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)


async def in_thread(fn: Callable[[], T], name: str = "bloombee-blocking") -> T:
    """``fn()`` on a thread of its own, awaited without blocking the event loop.

    Unlike ``loop.run_in_executor(None, ...)`` this works at interpreter exit too: ``concurrent.futures``
    shuts its executors down before ``atexit`` callbacks run, and a client left open is closed by one.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result, error = fn(), None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: nobody awaits the result any more
            pass

    threading.Thread(target=target, name=name, daemon=True).start()
    return await done
