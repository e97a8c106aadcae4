"""The two sides of an inference session a distributed model keeps: the handle the caller steps tokens
through (``model.inference_session()``), and the transformers ``Cache`` that ``generate`` sees, which
only tracks how many tokens the servers hold."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache

from bloombee_core.client.sessions import InferenceSession

if TYPE_CHECKING:
    from bloombee_core.client.model import DistributedModelForCausalLM
    from bloombee_core.swarm.routing import Hop


class RemoteCache(Cache):
    """The transformers-facing side of an inference session: the servers hold the keys and values."""

    is_compileable = False

    def __init__(self, session: InferenceSessionHandle) -> None:  # no super(): there are no local layers
        self.session = session
        self.layers = []

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.position

    @property
    def is_linear(self) -> list[bool]:
        return [False]

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def is_croppable(self) -> bool:
        return False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported over the swarm yet; use greedy or sampling")

    def __repr__(self) -> str:
        return f"RemoteCache(position={self.session.position})"


class InferenceSessionHandle:
    """What ``model.inference_session()`` yields: server-side caches kept across calls in the block."""

    def __init__(
        self,
        model: DistributedModelForCausalLM,
        max_length: int,
        trees: bool = False,
        group: str | None = None,
    ) -> None:
        self.model = model
        self.inner = InferenceSession(model.swarm, max_length, trees, model.prefill_chunk, group)
        remote = model.tuning_method.remote(1) if model.tuning_method is not None else None
        self.inner.adapter = remote.adapter if remote is not None else None  # generation with a trained LoRA
        self.inner.on_chunks = model.pipeline_stats.chunks
        self.speculation: dict[str, Any] = {}  # what speculative decoding achieved in this session

    @property
    def position(self) -> int:
        return self.inner.position

    @property
    def route(self) -> list[Hop]:
        return self.inner.route

    def stats(self) -> list[dict[str, Any]]:
        """Per server of the chain: steps run, and whether their inputs came from the client or by push."""
        return self.inner.stats()

    def step(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | None,
        per_layer: dict[str, torch.Tensor] | None = None,
        tree: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states through every block (see :meth:`InferenceSession.step` for ``tree`` and ``keep``)."""
        stats = self.model.pipeline_stats
        stats.enter("steps")
        try:
            return self.model.loop.run(self.inner.step(hidden, position_ids, mask, per_layer, tree, keep))
        finally:
            stats.leave("steps")

    @torch.no_grad()
    def step_tokens(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        tree: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens in, the last block's hidden states out ([batch, tokens, hidden]; ``model.client.logits``
        turns any of them into logits). What speculative decoding runs each round: a token tree and the
        rows of the previous round to keep."""
        client = self.model.client
        hidden = client.embed(input_ids)
        per_layer = client.per_layer_inputs(input_ids, hidden)
        mask = attention_mask.to(torch.int64) if attention_mask is not None else None
        return self.step(hidden, position_ids.to(torch.int64), mask, per_layer, tree, keep).to(hidden.dtype)

    def close(self) -> None:
        self.model.loop.soon(self.inner.close)  # its streams belong to the loop's thread
