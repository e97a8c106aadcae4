"""The client's share of a model: embeddings, final norm and LM head, run through its family adapter."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from bloombee_core.family import ModelFamily


class ClientPart(nn.Module):
    """The client's share of the model: embeddings, final norm, LM head (tied or not)."""

    def __init__(self, family: ModelFamily, config: PretrainedConfig, model: nn.Module) -> None:
        super().__init__()
        self.family = family
        self.config = config
        self.model = model

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.family.embed(self, input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.family.logits(self, hidden)

    def hidden_from_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        """Hidden states entering block 0 for user-given ``inputs_embeds``, as the transformers model does."""
        return self.family.hidden_from_embeds(self, embeds)

    def per_layer_inputs(
        self, input_ids: torch.Tensor | None, hidden: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-layer inputs for all blocks, [batch, tokens, num_blocks, size] each (empty for most families).

        ``hidden`` is :meth:`embed`'s output for ``input_ids`` (or :meth:`hidden_from_embeds`'s for given
        embeddings, with ``input_ids=None``). Send span ``a:b`` the slice ``[:, :, a:b]``.
        """
        return self.family.compute_per_layer_inputs(self, input_ids, hidden)
