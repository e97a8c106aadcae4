"""A transport and a model family that are never picked by default, only by name in swarm.toml.

Each writes one line per use to the file named by ``$BLOOMBEE_EXAMPLE_LOG`` (pid and what was used), so
a test can prove which processes used them.
"""

from __future__ import annotations

import os
from typing import Any

from bloombee_family_llama import LlamaFamily
from bloombee_hivemind.transport import HivemindTransport

LOG = "BLOOMBEE_EXAMPLE_LOG"


def _log(what: str) -> None:
    path = os.environ.get(LOG)
    if path:
        with open(path, "a") as f:
            f.write(f"{os.getpid()} {what}\n")


class RecordingTransport(HivemindTransport):
    name = "example-recording"
    description = "hivemind, noting each start in $BLOOMBEE_EXAMPLE_LOG"

    async def start(self, **kwargs: Any) -> None:
        await super().start(**kwargs)
        _log("transport client" if kwargs.get("client_mode") else "transport peer")


class RecordingLlama(LlamaFamily):
    name = "example-llama"
    description = "the LLaMA adapter, noting each load in $BLOOMBEE_EXAMPLE_LOG"
    model_types = ()  # never chosen by model_type: only as model.family = "example-llama"

    def load_client(self, *args: Any, **kwargs: Any) -> Any:
        _log("family client")
        return super().load_client(*args, **kwargs)

    def load_span(self, *args: Any, **kwargs: Any) -> Any:
        _log("family span")
        return super().load_span(*args, **kwargs)
