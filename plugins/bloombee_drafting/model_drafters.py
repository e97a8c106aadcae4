"""Drafters that run a causal LM on the client CPU: ``draft-model`` (a small model sharing the target's
tokenizer) and ``early-exit`` (the target's own first blocks, final norm and LM head).

Both draft the same way: the model's greedy chain, plus at each depth its next ``branch`` most likely
tokens as leaf siblings. Each sequence keeps its own KV cache across rounds; a round crops it to the
longest prefix the committed tokens still agree with and feeds only what is new.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from bloombee_core.drafting import Drafter, DraftTree
from bloombee_core.dtypes import DtypeName
from bloombee_core.plugin import PluginOptions
from bloombee_drafting.trees import ROOT, TreeBuilder

if TYPE_CHECKING:
    import torch
    from transformers import DynamicCache, PretrainedConfig, PreTrainedModel

    from bloombee_core.client.model import DistributedModelForCausalLM


class LocalModelOptions(PluginOptions):
    branch: int = Field(
        default=1, ge=0, description="at each depth, this many next most likely tokens as leaf siblings"
    )
    dtype: DtypeName | None = Field(
        default=None, description="the draft model's dtype on the client CPU; unset: the target's dtype"
    )


class LocalModelDrafter(Drafter):
    """Drafts with a causal LM held on the client; subclasses say which model (:meth:`load_model`).

    The model stays loaded between generations for the same target and dtype (a strategy keeps its
    drafter): only the per-sequence caches are dropped at :meth:`end`."""

    Options: ClassVar[type[PluginOptions]] = LocalModelOptions

    def __init__(self, options: PluginOptions | None = None) -> None:
        super().__init__(options)
        self.model: PreTrainedModel | None = None
        self._loaded: tuple[PreTrainedModel, object] | None = None  # (model, what it was loaded for)
        self._rows: list[RowCache] = []

    def load_model(self, target: DistributedModelForCausalLM, dtype: torch.dtype) -> PreTrainedModel:
        raise NotImplementedError

    def begin(self, target: DistributedModelForCausalLM, batch_size: int) -> None:
        from bloombee_core.dtypes import torch_dtype

        dtype = torch_dtype(self.options.dtype or target.dtype)
        key = (str(target.folder), dtype)
        if self._loaded is None or self._loaded[1] != key:
            self._loaded = (self.load_model(target, dtype).to("cpu").eval(), key)
        self.model = self._loaded[0]
        self._rows = [RowCache() for _ in range(batch_size)]

    def propose(self, sequences: Sequence[Sequence[int]], max_nodes: int, max_depth: int) -> list[DraftTree]:
        if self.model is None:
            raise RuntimeError(f"drafter {self.name!r}: propose() was called before begin()")
        if len(sequences) != len(self._rows):
            raise ValueError(f"begin() was told {len(self._rows)} sequences, propose() got {len(sequences)}")
        import torch

        with torch.inference_mode():
            return [
                self._tree(row, list(sequence), max_nodes, max_depth)
                for row, sequence in zip(self._rows, sequences, strict=True)
            ]

    def end(self) -> None:
        self.model, self._rows = None, []

    def _tree(self, row: RowCache, sequence: list[int], max_nodes: int, max_depth: int) -> DraftTree:
        builder = TreeBuilder(max_nodes)
        # the chain first, siblings take what budget is left; an empty sequence has no root to draft from
        depth = min(max_depth, max_nodes) if sequence else 0
        siblings_left = max_nodes - depth
        chain: list[int] = []
        parent = ROOT
        if depth > 0:
            row.rewind(self.model, sequence)
        for _ in range(depth):
            logits = row.next_logits(self.model, sequence + chain)
            token = int(logits.argmax())
            node = builder.child(parent, token)
            width = min(self.options.branch, siblings_left)
            if width:
                ranked = logits.topk(width + 1).indices.tolist()
                for sibling in [t for t in ranked if t != token][:width]:
                    builder.child(parent, sibling)
                    siblings_left -= 1
            chain.append(token)
            parent = node
        return builder.tree()


class RowCache:
    """One sequence's KV cache (batch 1) and the tokens it holds, kept across rounds.

    Sliding-window layers record what a round feeds (``activate_past_recording``), so the next round can
    crop the drafted tokens the target rejected; the crop at the start of each round drops that record.
    """

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.tokens: list[int] = []
        self.recorded = 0  # tokens fed since the last crop: how far back a crop can go

    def rewind(self, model: PreTrainedModel, sequence: list[int]) -> None:
        """Keep only the cached tokens ``sequence`` still starts with (all but its last token at most:
        the logits after it are wanted)."""
        from transformers import DynamicCache

        keep = _common_prefix(self.tokens, sequence[:-1])
        removed = len(self.tokens) - keep
        if self.cache is None or (removed and (removed > self.recorded or not self.cache.is_croppable)):
            self.cache, self.tokens = DynamicCache(config=model.config), []
            self.cache.activate_past_recording()
        else:
            self.cache.crop(-removed)
            del self.tokens[keep:]
        self.recorded = 0

    def next_logits(self, model: PreTrainedModel, sequence: list[int]) -> torch.Tensor:
        """The model's logits for the token after ``sequence``, which extends the cached tokens: only the
        tokens the cache lacks are fed."""
        import torch

        new = sequence[len(self.tokens) :]
        out = model(input_ids=torch.tensor([new]), cache=self.cache, use_cache=True, logits_to_keep=1)
        self.tokens.extend(new)
        self.recorded += len(new)
        return out.logits[0, -1]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class DraftModelOptions(LocalModelOptions):
    path: str = Field(
        description="the draft model: a local folder, a .gguf file or a hub id (as for [model] path); "
        "it must share the target's tokenizer"
    )


class DraftModelDrafter(LocalModelDrafter):
    """A small causal LM with the target's tokenizer, run on the client CPU."""

    name: ClassVar[str] = "draft-model"
    description: ClassVar[str] = "a small local model with the target's tokenizer (path, branch, dtype)"
    Options: ClassVar[type[PluginOptions]] = DraftModelOptions

    def load_model(self, target: DistributedModelForCausalLM, dtype: torch.dtype) -> PreTrainedModel:
        from transformers import AutoModelForCausalLM

        from bloombee_core.model import load_config
        from bloombee_core.model_files import resolve_model

        folder = resolve_model(self.options.path)
        draft_vocab = _vocab_size(load_config(folder))
        target_vocab = _vocab_size(target.config)
        if draft_vocab != target_vocab:
            raise ValueError(
                f"draft model {self.options.path!r} has a vocabulary of {draft_vocab} tokens, the target "
                f"{target_vocab}: a draft model must share the target's tokenizer; choose one from the "
                "target's family (or the prompt-lookup / early-exit drafters)"
            )
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)


def _vocab_size(config: PretrainedConfig) -> int | None:
    return getattr(config.get_text_config(), "vocab_size", None)


class EarlyExitOptions(LocalModelOptions):
    blocks: int | None = Field(
        default=None, ge=1, description="the target's first blocks run; unset: a quarter of them, at least 1"
    )


class EarlyExitDrafter(LocalModelDrafter):
    """The target's own first ``blocks`` decoder blocks, then its final norm and LM head, on the client."""

    name: ClassVar[str] = "early-exit"
    description: ClassVar[str] = "the target's first blocks + final norm + LM head on the client (blocks)"
    Options: ClassVar[type[PluginOptions]] = EarlyExitOptions

    def load_model(self, target: DistributedModelForCausalLM, dtype: torch.dtype) -> PreTrainedModel:
        from transformers import AutoModelForCausalLM

        total = target.config.num_hidden_layers
        blocks = self.options.blocks or max(1, total // 4)
        if blocks > total:
            raise ValueError(
                f"early-exit blocks = {blocks}, but the target ({target.folder}) has {total} blocks; "
                f"choose 1 to {total}"
            )
        from bloombee_core.model import load_config

        # the checkpoint's own config: the client model's copy carries settings made for a model
        # without layers (its attention / experts implementation)
        model, info = AutoModelForCausalLM.from_pretrained(
            target.folder,
            config=first_blocks_config(load_config(target.folder), blocks),
            dtype=dtype,
            output_loading_info=True,
        )
        if info["missing_keys"]:  # they would be random: refuse rather than draft noise
            missing = sorted(info["missing_keys"])
            raise ValueError(
                f"the checkpoint at {target.folder} lacks weights of its first {blocks} blocks: {missing[:4]}"
            )
        return model


def first_blocks_config(config: PretrainedConfig, blocks: int) -> PretrainedConfig:
    """A copy of ``config`` with only its first ``blocks`` decoder layers."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = blocks
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:blocks]
    return config
