"""The span runtime: what a :class:`~bloombee_core.family.ModelFamily` adapter's checkpoint becomes.

* :class:`ClientPart` (``client_part``): embeddings, final norm and LM head, on the client;
* :class:`BlockSpan` and its :class:`SpanCache` (``span``): decoder layers ``start:end``, on a server;
* :func:`load_config` and :class:`TensorSource` (``checkpoint``): a model folder's config and tensors,
  and the helpers :meth:`ModelFamily.load_span <bloombee_core.family.ModelFamily.load_span>` builds with.

Importing this package imports torch and transformers; the adapter contract does not.
"""

from __future__ import annotations

from bloombee_core.model.checkpoint import TensorSource, load_config
from bloombee_core.model.client_part import ClientPart
from bloombee_core.model.span import BlockSpan, SpanCache

__all__ = ["BlockSpan", "ClientPart", "SpanCache", "TensorSource", "load_config"]
