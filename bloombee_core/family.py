"""The model-family adapter contract: :class:`ModelFamily` and what adapters use beside it.

A family adapter turns a Hugging Face checkpoint folder into two things:

* a client part (embeddings, final norm, LM head) that lives on the client, and
* a span of decoder layers ``start:end`` that a server runs on its own.

Both are built and run by the runtime in :mod:`bloombee_core.model` (``ClientPart``, ``BlockSpan``,
``load_config``, ``TensorSource``); this module is what an adapter author reads and imports. It imports
neither torch nor transformers at import time, so listing plugins stays fast: an adapter does the same,
importing heavy modules inside its methods (and for annotations under ``TYPE_CHECKING``).

transformers 5.x decoder layers do not compute positions or masks themselves: the model builds rotary
``position_embeddings`` and causal / sliding-window masks once and hands them to every layer. A span
rebuilds exactly what the full model would have handed to *its* layers, using the same transformers
functions, so the numbers match the reference bit for bit in fp32.

Most families are pure data on top of :class:`ModelFamily` (which layer class, where the weights live);
families whose blocks take other inputs (BLOOM's ALiBi, Falcon) override the few methods that differ.
The override points, by concern:

* structure: :meth:`~ModelFamily.num_blocks`, :meth:`~ModelFamily.allowed_cuts`,
  :meth:`~ModelFamily.layer_type`, :meth:`~ModelFamily.owns_kv`, :meth:`~ModelFamily.kv_shape`,
  :meth:`~ModelFamily.per_layer_input_sizes`, :meth:`~ModelFamily.compute_per_layer_inputs`,
  :meth:`~ModelFamily.rotary_takes_layer_type`;
* loading: :meth:`~ModelFamily.convert_layer_state`, :meth:`~ModelFamily.make_layer`,
  :meth:`~ModelFamily.decoder_layer_class`, :meth:`~ModelFamily.make_rotary`,
  :meth:`~ModelFamily.build_client_model`;
* running: :meth:`~ModelFamily.embed`, :meth:`~ModelFamily.hidden_from_embeds`,
  :meth:`~ModelFamily.logits`, :meth:`~ModelFamily.layer_context`, :meth:`~ModelFamily.run_layer`,
  :meth:`~ModelFamily.new_kv`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from bloombee_core.plugin import Plugin

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PretrainedConfig
    from transformers.cache_utils import Cache

    from bloombee_core.model import BlockSpan, ClientPart
    from bloombee_core.model.tree import TreeAttention

FULL = "full_attention"
SLIDING = "sliding_attention"


def span_problem(
    start: int, end: int, within: tuple[int, int], cuts: Iterable[int], owner: str = "the model"
) -> str | None:
    """Why blocks ``start:end`` are not a valid span inside blocks ``within`` (held by ``owner``) of a
    model that may be cut only at ``cuts``; ``None`` when they are. The one rule servers, clients and
    loaders share."""
    low, high = within
    if not low <= start < end <= high:
        return f"blocks {start}:{end} are out of range: {owner} holds blocks {low}:{high}"
    allowed = sorted(set(cuts))
    if start not in allowed or end not in allowed:
        return (
            f"blocks {start}:{end} cut the model where it cannot be cut (layers that share keys/values "
            f"stay together); spans may start and end only at blocks {allowed}"
        )
    return None


@dataclass
class LayerContext:
    """What every decoder layer of one span forward receives besides its hidden states (built once per
    forward by :meth:`ModelFamily.layer_context`): positions, masks and rotary tables per layer type,
    family extras (ALiBi), and the client's per-layer inputs."""

    position_ids: torch.Tensor
    masks: dict[str, Any] = field(default_factory=dict)  # layer type -> mask (None = plain causal)
    position_embeddings: dict[str, Any] = field(default_factory=dict)  # layer type -> (cos, sin)
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific (e.g. ALiBi)
    per_layer: dict[str, torch.Tensor] = field(default_factory=dict)  # client-computed per-layer inputs


def alibi_at(
    build_alibi_tensor: Callable, positions: torch.Tensor, heads: int, dtype: torch.dtype
) -> torch.Tensor:
    """The model's own ALiBi bias [batch * heads, 1, keys] for keys at ``positions`` [batch, keys] (the
    positions of a token tree's nodes repeat and are not a running count of the mask, so the model's
    ``build_alibi_tensor`` is evaluated on 0..max and read at each key's position: the same numbers)."""
    import torch

    batch, keys = positions.shape
    ones = torch.ones(1, int(positions.max()) + 1, dtype=torch.long, device=positions.device)
    table = build_alibi_tensor(ones, heads, dtype)[:, 0, :]  # [heads, positions]
    return table[:, positions.clamp(min=0)].permute(1, 0, 2).reshape(batch * heads, 1, keys)


def past_length(span: BlockSpan, kv: Cache | None) -> int:
    """Tokens already in the span's cache. Ask the span's own first layer: layers before it are empty here."""
    return kv.get_seq_length(span.start) if kv is not None else 0


def fuse_experts(
    state: dict[str, torch.Tensor], experts: str, gate: str, up: str, down: str
) -> dict[str, torch.Tensor]:
    """Stack per-expert checkpoint matrices into transformers 5's fused 3-D expert parameters.

    Hub checkpoints store ``{experts}.{e}.{gate|up|down}.weight``; transformers 5 modules hold
    ``{experts}.gate_up_proj`` [E, 2I, H] (gate rows then up rows) and ``{experts}.down_proj`` [E, H, I].
    A checkpoint already in the fused layout passes through unchanged. For
    :meth:`ModelFamily.convert_layer_state`.
    """
    import torch

    head = f"{experts}."
    count = len({name[len(head) :].split(".")[0] for name in state if name.startswith(head)} - _FUSED)
    if count == 0:
        return state
    out = {name: t for name, t in state.items() if not name.startswith(head)}

    def stacked(kind: str) -> torch.Tensor:
        return torch.stack([state[f"{head}{e}.{kind}.weight"] for e in range(count)])

    out[f"{head}gate_up_proj"] = torch.cat([stacked(gate), stacked(up)], dim=1)
    out[f"{head}down_proj"] = stacked(down)
    return out


_FUSED = {"gate_up_proj", "down_proj"}


class ModelFamily(Plugin):
    """Adapter base. Subclasses set ``name`` and ``model_types``; override methods only where they differ.

    Data-like attributes describe where a checkpoint keeps things (transformers ``*ForCausalLM`` naming).
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    layer_prefix: ClassVar[str] = "model.layers."  # checkpoint prefix of decoder layer ``i``
    final_norm: ClassVar[str] = "model.norm"  # attribute path of the final norm in the CausalLM
    rotary: ClassVar[str | None] = "model.rotary_emb"  # attribute path of the rotary module, if any

    @property
    def base_prefix(self) -> str:
        """The base model's prefix in checkpoint names ("model.", "transformer.")."""
        return self.layer_prefix.split(".", 1)[0] + "."

    # ---- structure -------------------------------------------------------------------------------
    def num_blocks(self, config: PretrainedConfig) -> int:
        """How many decoder blocks the model has: what servers host and clients route over."""
        return int(config.num_hidden_layers)

    def allowed_cuts(self, config: PretrainedConfig) -> list[int]:
        """Block indices where a span may start or end (every one by default)."""
        return list(range(self.num_blocks(config) + 1))

    def layer_type(self, config: PretrainedConfig, index: int) -> str:
        """Which mask / cache kind layer ``index`` uses, exactly as the transformers model decides."""
        layer_types = getattr(config, "layer_types", None)
        if layer_types:
            return layer_types[index]
        # Mistral-style configs: one sliding window for every layer when it is set
        return SLIDING if getattr(config, "sliding_window", None) is not None else FULL

    def owns_kv(self, config: PretrainedConfig, index: int) -> bool:
        """False for layers that reuse another layer's keys/values (Gemma 4 KV sharing) and cache nothing."""
        return True

    def per_layer_input_sizes(self, config: PretrainedConfig) -> dict[str, int]:
        """Per-layer inputs a span needs from the client besides hidden states: name -> feature size.

        Each arrives as a tensor [batch, tokens, end - start, size] (the span's own layers), in the hidden
        states' dtype; the client computes all layers' values with ``ClientPart.per_layer_inputs``.
        """
        return {}

    def compute_per_layer_inputs(
        self, client: ClientPart, input_ids: torch.Tensor, hidden: torch.Tensor
    ) -> dict:
        """The client's :meth:`per_layer_input_sizes` for all blocks, each [batch, tokens, num_blocks, size]."""
        return {}

    def rotary_takes_layer_type(self, config: PretrainedConfig) -> bool:
        """Gemma 3 style: one rotary table per layer type, ``rotary(x, positions, layer_type)``."""
        return False

    def kv_shape(self, config: PretrainedConfig, index: int) -> tuple[int, int]:
        """(key/value heads, head size) of layer ``index``; for the server's memory budget."""
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return kv_heads, head_dim

    # ---- loading ---------------------------------------------------------------------------------
    def load_client(
        self,
        path: str | Path,
        config: PretrainedConfig,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
    ) -> ClientPart:
        """The client part of the checkpoint folder ``path``: :meth:`build_client_model`, filled from it."""
        from bloombee_core.model.checkpoint import TensorSource, is_tied
        from bloombee_core.model.client_part import ClientPart

        source = TensorSource(path, self.base_prefix)
        model = self.build_client_model(config, dtype, device="cpu")
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()  # skipped by no_init_weights; the LM head must be the embedding matrix
        expected = model.state_dict()
        state = {name: source.read(name) for name in expected if name in source}
        missing = [name for name in model.load_state_dict(state, strict=False).missing_keys]
        missing = [name for name in missing if not is_tied(model, name)]
        if missing:
            raise KeyError(f"the checkpoint at {path} lacks the client tensors {missing}")
        return ClientPart(self, model.config, model).to(device=device, dtype=dtype).eval()

    def load_span(
        self,
        path: str | Path,
        config: PretrainedConfig,
        start: int,
        end: int,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
        place: Callable[[nn.Module], None] | None = None,
    ) -> BlockSpan:
        """Blocks ``start:end`` of the checkpoint folder ``path``, reading only their own tensors.

        ``place`` (an offload placer, ``device`` then unused) gets each layer as soon as it is loaded
        on the CPU, so that no more than one layer is read ahead of where it will live."""
        from bloombee_core.model.checkpoint import (
            TensorSource,
            layer_from_state,
            meta_skeleton,
            prepared_config,
        )
        from bloombee_core.model.span import BlockSpan

        problem = span_problem(start, end, (0, self.num_blocks(config)), self.allowed_cuts(config))
        if problem:
            raise ValueError(problem)
        skeleton = meta_skeleton(config)
        config = prepared_config(config, skeleton)
        source = TensorSource(path, self.base_prefix)
        layer_cls = self.decoder_layer_class(config)
        layers = []
        for index in range(start, end):
            prefix = f"{self.layer_prefix}{index}."
            state = {name[len(prefix) :]: source.read(name) for name in source.names(prefix)}
            state = self.convert_layer_state(config, index, state)
            layer = layer_from_state(partial(self.make_layer, layer_cls, config, index), state)
            if place is None:
                layers.append(layer.to(device=device, dtype=dtype))
            else:  # the placer moves it (and whatever is outside the layers, when it finishes)
                place(layer.to(dtype=dtype))
                layers.append(layer)
        span = BlockSpan(self, config, start, end, layers, self.make_rotary(config, skeleton))
        return (span if place is not None else span.to(device=device)).eval()

    def convert_layer_state(
        self, config: PretrainedConfig, index: int, state: dict[str, torch.Tensor]
    ) -> dict:
        """Map a checkpoint's per-layer tensor names to the layer module's (identity unless overridden)."""
        return state

    def make_layer(self, layer_cls: type, config: PretrainedConfig, index: int) -> nn.Module:
        """Decoder layer ``index``, built empty (on the meta device if it can be) before its tensors load."""
        return layer_cls(config, layer_idx=index)

    def decoder_layer_class(self, config: PretrainedConfig) -> type:
        """The transformers decoder-layer class, found through the CausalLM's ``_no_split_modules``."""
        import sys

        from bloombee_core.model.checkpoint import causal_lm_class

        lm_cls = causal_lm_class(config)
        names = list(lm_cls._no_split_modules or [])
        modeling = sys.modules[lm_cls.__module__]
        for name in names:
            if hasattr(modeling, name):
                return getattr(modeling, name)
        raise TypeError(f"cannot find the decoder layer class of {lm_cls.__name__} (looked for {names})")

    def make_rotary(self, config: PretrainedConfig, skeleton: nn.Module) -> nn.Module | None:
        """A fresh rotary module of the model's own class (built for real: its tables are buffers)."""
        if self.rotary is None:
            return None
        return type(attrgetter(self.rotary)(skeleton))(config=config)

    def build_client_model(self, config: PretrainedConfig, dtype: torch.dtype, device: str) -> nn.Module:
        """The family's own CausalLM with zero decoder layers, uninitialised: exactly the client's modules.

        The loader fills it from the checkpoint; override it where the layer count shapes other modules.
        """
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        from bloombee_core.model.checkpoint import zero_layer_config

        with no_init_weights(), torch.device(device):
            return AutoModelForCausalLM.from_config(zero_layer_config(config), dtype=dtype)

    # ---- running (client) ------------------------------------------------------------------------
    def embed(self, client: ClientPart, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states entering block 0 for ``input_ids``."""
        return self.hidden_from_embeds(client, client.model.get_input_embeddings()(input_ids))

    def hidden_from_embeds(self, client: ClientPart, embeds: torch.Tensor) -> torch.Tensor:
        """What the transformers model does to ``inputs_embeds`` before its first block (identity for
        most; BLOOM applies its embedding LayerNorm; Gemma's sqrt(hidden) scale lives in its embedding
        module, so given embeddings are used as they are, exactly as transformers does)."""
        return embeds

    def logits(self, client: ClientPart, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm, LM head and (if the config asks) logit soft-capping, as transformers applies them."""
        import torch

        hidden = attrgetter(self.final_norm)(client.model)(hidden)
        logits = client.model.get_output_embeddings()(hidden)
        cap = getattr(client.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ---- running (span) --------------------------------------------------------------------------
    def layer_context(
        self,
        span: BlockSpan,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        kv: Cache | None,
        tree: TreeAttention | None = None,
    ) -> LayerContext:
        """What every layer of ``span`` receives besides hidden states, built once per forward exactly as
        the transformers model builds it for those layers: a mask and rotary tables per layer type.

        With ``tree`` (a token-tree step, or any step of a session made for trees) the masks come from
        its visibility instead (:meth:`TreeAttention.mask`); positions are the given ``position_ids``."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        context = LayerContext(position_ids=position_ids)
        first_of_type: dict[str, int] = {}
        for index in range(span.start, span.end):  # size each mask against a layer that holds a cache
            if self.owns_kv(span.config, index):
                first_of_type.setdefault(self.layer_type(span.config, index), index)
        for kind, index in first_of_type.items():
            if tree is not None:
                window = span.config.sliding_window if kind == SLIDING else None
                context.masks[kind] = tree.mask(span.config, hidden.dtype, window)
            else:
                make_mask = create_sliding_window_causal_mask if kind == SLIDING else create_causal_mask
                context.masks[kind] = make_mask(
                    config=span.config,
                    inputs_embeds=hidden,
                    attention_mask=attention_mask,
                    cache=kv,
                    position_ids=position_ids,
                    layer_idx=index,
                )
            if span.rotary is not None:
                if self.rotary_takes_layer_type(span.config):
                    context.position_embeddings[kind] = span.rotary(hidden, position_ids, kind)
                else:
                    context.position_embeddings[kind] = span.rotary(hidden, position_ids)
        return context

    def run_layer(
        self,
        span: BlockSpan,
        layer: nn.Module,
        index: int,
        hidden: torch.Tensor,
        context: LayerContext,
        kv: Cache | None,
    ) -> torch.Tensor:
        """Decoder layer ``index`` of ``span`` applied to ``hidden``; returns the new hidden states."""
        kind = self.layer_type(span.config, index)
        out = layer(
            hidden,
            attention_mask=context.masks[kind],
            position_embeddings=context.position_embeddings.get(kind),
            position_ids=context.position_ids,
            cache=kv,
            use_cache=kv is not None,
        )
        return out[0] if isinstance(out, tuple) else out

    def new_kv(self, config: PretrainedConfig) -> Cache:
        """An empty KV cache for one session: a transformers ``Cache`` indexed by global layer number."""
        from transformers import DynamicCache

        return DynamicCache(config=config)
