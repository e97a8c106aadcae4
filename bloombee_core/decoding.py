"""Decoding strategies: how the client turns logits into tokens.

The distributed client model is a ``transformers`` ``GenerationMixin`` model, so decoding is
``transformers``' own ``generate``: a strategy only contributes its keyword arguments and, where it
samples, the random state the sampling draws from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from bloombee_core.plugin import Plugin

if TYPE_CHECKING:
    import torch
    from transformers import GenerationMixin

__all__ = ["DecodingStrategy"]


class DecodingStrategy(Plugin):
    """Base of every decoding strategy (kind ``"decoding_strategies"``).

    Subclasses set ``name`` and implement :meth:`generation_kwargs`; a strategy that needs a
    repeatable random state overrides :meth:`random_state`.
    """

    def generation_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``transformers``' ``generate`` (``do_sample``, ``temperature`` ...)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def random_state(self) -> Iterator[None]:
        """The random state ``generate`` runs in; by default the caller's, untouched."""
        yield

    def generate(self, model: GenerationMixin, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Run ``model.generate`` with this strategy; explicit ``kwargs`` win over the strategy's own."""
        with self.random_state():
            return model.generate(input_ids, **{**self.generation_kwargs(), **kwargs})
