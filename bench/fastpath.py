"""Trial fixes for the hot path, applied at run time, so their effect can be measured before anyone edits the swarm.

The benchmark never changes the swarm's files; a variant (``python -m bench --variant coalesce``) runs the
servers through this module's entry point and patches the client in process, then labels its rows.

``coalesce``: :class:`bloombee_core.transport.FrameStream` writes every frame at once (a 4-byte length,
then the data: two ``write`` calls), and a wire message is a header frame plus one frame per tensor, so
a decode step's request costs up to 8 socket writes — each one a system call here and a wake-up of the
``p2pd`` daemon on the other side of the unix socket. The patch queues frames written with
``drain=False`` and sends them in one ``write`` at the next ``drain()``: one system call per message.

    python -m bench.fastpath coalesce serve MODEL ...   # a server with the patch, arguments as `bloombee`
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

VARIANTS = ("coalesce",)


@contextmanager
def patched(variant: str) -> Iterator[None]:
    """``variant`` applied in this process for the duration of the block (``""``: nothing)."""
    if not variant:
        yield
        return
    from bloombee_core.transport import FrameStream

    saved = {name: FrameStream.__dict__[name] for name in ("write_frame", "drain", "close")}
    apply(variant)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(FrameStream, name, value)
        FrameStream._bench_coalesced = False


def apply(variant: str) -> None:
    if variant != "coalesce":
        raise ValueError(f"unknown fast-path variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    from bloombee_core.transport import FrameStream, TransportError

    if getattr(FrameStream, "_bench_coalesced", False):
        return
    original_drain = FrameStream.drain

    def flush(stream: Any) -> None:
        pending = stream.__dict__.pop("_bench_pending", None)
        if pending:
            try:
                stream.writer.write(b"".join(pending))
            except (ConnectionError, OSError, RuntimeError) as exc:
                raise TransportError(f"cannot write to {stream.peer}: {exc}") from None

    async def write_frame(self: Any, data: bytes | memoryview, *, drain: bool = True) -> None:
        pending = self.__dict__.setdefault("_bench_pending", [])
        pending.append(len(data).to_bytes(4, "big"))
        pending.append(bytes(data))
        if drain:
            await self.drain()

    async def drain(self: Any) -> None:
        flush(self)
        await original_drain(self)

    def close(self: Any, _close: Any = FrameStream.close) -> None:
        try:
            flush(self)
        except TransportError:
            pass
        _close(self)

    FrameStream.write_frame = write_frame
    FrameStream.drain = drain
    FrameStream.close = close
    FrameStream._bench_coalesced = True


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in VARIANTS:
        print(f"usage: python -m bench.fastpath {{{','.join(VARIANTS)}}} BLOOMBEE-ARGS...", file=sys.stderr)
        return 2
    apply(argv[0])
    from bloombee_core.cli import main as bloombee

    return bloombee(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
