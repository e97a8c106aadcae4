"""The server's compute thread runs inference steps before queued training work (stateless forward /
backward), each kind in arrival order, without interrupting the job that runs."""

from __future__ import annotations

import asyncio
import threading

from bloombee_core.server.compute import BULK, INTERACTIVE, ComputeThread


def test_inference_steps_overtake_queued_training_work() -> None:
    thread = ComputeThread()
    started, release = threading.Event(), threading.Event()
    order: list[str] = []

    def blocking() -> None:  # a long backward already running when the others arrive
        started.set()
        release.wait(10)
        order.append("running backward")

    async def main() -> None:
        first = asyncio.ensure_future(thread.run(blocking, priority=BULK))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        queued = [
            asyncio.ensure_future(thread.run(order.append, name, priority=priority))
            for name, priority in (
                ("backward 1", BULK),
                ("step 1", INTERACTIVE),
                ("backward 2", BULK),
                ("step 2", INTERACTIVE),
            )
        ]
        await asyncio.sleep(0.05)  # every job is queued behind the running one
        release.set()
        await asyncio.gather(first, *queued)

    try:
        asyncio.run(main())
    finally:
        thread.shutdown()
    assert order == ["running backward", "step 1", "step 2", "backward 1", "backward 2"]
