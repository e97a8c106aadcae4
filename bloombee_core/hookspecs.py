"""Hook specifications: one ``bloombee_register_<kind>`` hook per extension kind.

Every hook takes no arguments and returns the plugin classes it contributes (a list, possibly
empty). Hooks are called once, when :func:`bloombee_core.build` (or
:func:`bloombee_core.registry.load_plugins`) assembles the stack — never per token or per block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from bloombee_core.compression import Compressor
    from bloombee_core.decoding import DecodingStrategy
    from bloombee_core.drafting import Drafter
    from bloombee_core.family import ModelFamily
    from bloombee_core.offload import OffloadPolicy
    from bloombee_core.transport import Transport
    from bloombee_core.tuning import TuningMethod

PROJECT = "bloombee"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def bloombee_register_model_families() -> list[type[ModelFamily]]:
    """Contribute model-family adapters.

    A family adapter splits a Hugging Face checkpoint into the client part (embeddings, final
    norm, LM head) and blocks, and runs any span of blocks on its own. The family is chosen by
    the checkpoint config's ``model_type``, matched against each adapter's ``model_types``.

    :return: adapter classes derived from :class:`bloombee_core.family.ModelFamily`.

    .. versionadded:: 0.1
    """


@hookspec
def bloombee_register_transports() -> list[type[Transport]]:
    """Contribute transports: how peers find each other and exchange messages.

    :return: classes derived from :class:`bloombee_core.transport.Transport`.

    .. versionadded:: 0.1
    """


@hookspec
def bloombee_register_compressors() -> list[type[Compressor]]:
    """Contribute lossless activation compressors used on the wire.

    :return: classes derived from :class:`bloombee_core.compression.Compressor`.

    .. versionadded:: 0.1
    """


@hookspec
def bloombee_register_offload_policies() -> list[type[OffloadPolicy]]:
    """Contribute offload policies: where a server keeps each block's weights.

    :return: classes derived from :class:`bloombee_core.offload.OffloadPolicy`.

    .. versionadded:: 0.1
    """


@hookspec
def bloombee_register_decoding_strategies() -> list[type[DecodingStrategy]]:
    """Contribute decoding strategies: how the client turns logits into tokens.

    :return: classes derived from :class:`bloombee_core.decoding.DecodingStrategy`.

    .. versionadded:: 0.1
    """


@hookspec
def bloombee_register_drafters() -> list[type[Drafter]]:
    """Contribute drafters: cheap proposals of the next tokens, checked by the target model in one pass.

    A drafter runs on the client and answers, per sequence, a tree of candidate tokens
    (:class:`bloombee_core.drafting.DraftTree`); speculative decoding keeps the longest path the target
    model agrees with, so a drafter changes how fast the output comes, never what it is.

    :return: classes derived from :class:`bloombee_core.drafting.Drafter`.

    .. versionadded:: 0.2
    """


@hookspec
def bloombee_register_tuning_methods() -> list[type[TuningMethod]]:
    """Contribute tuning methods: what a client trains while the servers' blocks stay frozen (prompts,
    deep prompts, heads, client-owned LoRA adapters), and what of it travels with remote requests.

    :return: classes derived from :class:`bloombee_core.tuning.TuningMethod`.

    .. versionadded:: 0.3
    """
