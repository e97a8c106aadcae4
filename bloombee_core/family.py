"""What every model family shares: the adapter base, the client part, a span of blocks and its KV cache.

A family adapter turns a Hugging Face checkpoint folder into two things:

* a :class:`ClientPart` (embeddings, final norm, LM head) that lives on the client, and
* a :class:`BlockSpan` (decoder layers ``start:end``) that a server runs on its own.

transformers 5.x decoder layers do not compute positions or masks themselves: the model builds rotary
``position_embeddings`` and causal / sliding-window masks once and hands them to every layer. A span
rebuilds exactly what the full model would have handed to *its* layers, using the same transformers
functions, so the numbers match the reference bit for bit in fp32.

Most families are pure data on top of :class:`ModelFamily` (which layer class, where the weights live);
families whose blocks take other inputs (BLOOM's ALiBi, Falcon) override the few hooks that differ.
"""

from __future__ import annotations

import copy
import json
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import transformers
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PretrainedConfig
from transformers.initialization import no_init_weights
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from bloombee_core.plugin import Plugin

FULL = "full_attention"
SLIDING = "sliding_attention"


def load_config(path: str | Path) -> PretrainedConfig:
    """Read ``config.json`` from a local model folder (no network)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json; pass a model folder (use bloombee_core.model_files.resolve_model "
            "to turn a hub id or .gguf file into one)"
        )
    return AutoConfig.from_pretrained(folder, local_files_only=True)


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


class TensorSource:
    """Reads single tensors by name from a folder of safetensors shards, lazily (memory-mapped).

    ``reads`` lists every tensor name read, so tests can check that a span reads only its own tensors.
    """

    def __init__(self, folder: str | Path, base_prefix: str = "") -> None:
        self.folder = Path(folder)
        self.stored: dict[str, str] = {}  # name we ask for -> name in the file, where they differ
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        else:
            shards = sorted(self.folder.glob("*.safetensors"))
            if not shards:
                raise FileNotFoundError(f"no *.safetensors files in {self.folder}")
            self.files = {}
            for shard in shards:
                with safe_open(shard, framework="pt") as f:
                    self.files.update({name: shard for name in f.keys()})
        if base_prefix and not any(name.startswith(base_prefix) for name in self.files):
            # checkpoints of the bare base model (e.g. bigscience BLOOM) omit "transformer."
            self.stored = {base_prefix + name: name for name in self.files}
            self.files = {base_prefix + name: file for name, file in self.files.items()}
        self.reads: list[str] = []

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self, prefix: str) -> list[str]:
        return [name for name in self.files if name.startswith(prefix)]

    def read(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.folder}")
        self.reads.append(name)
        with safe_open(self.files[name], framework="pt") as f:
            return f.get_tensor(self.stored.get(name, name))


class SpanCache:
    """A session's KV cache for one span. Wraps a transformers ``Cache`` indexed by global layer number."""

    def __init__(self, kv: Any, batch_size: int, max_length: int, layer_indices: Iterable[int]) -> None:
        self.kv = kv
        self.batch_size = batch_size
        self.max_length = max_length
        self.layer_indices = list(layer_indices)
        self.length = 0  # tokens already cached

    def nbytes(self) -> int:
        total = 0
        for i in self.layer_indices:
            layer = self.kv.layers[i]
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


@dataclass
class SpanInputs:
    """Everything a decoder layer receives besides hidden states, built once per span forward."""

    position_ids: torch.Tensor
    masks: dict[str, Any] = field(default_factory=dict)  # layer type -> mask (None = plain causal)
    position_embeddings: dict[str, Any] = field(default_factory=dict)  # layer type -> (cos, sin)
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific (e.g. ALiBi)
    side: dict[str, torch.Tensor] = field(default_factory=dict)  # client-computed per-layer inputs


class ModelFamily(Plugin):
    """Adapter base. Subclasses set ``name`` and ``model_types``; override hooks only where they differ.

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
        return int(config.num_hidden_layers)

    def allowed_cuts(self, config: PretrainedConfig) -> list[int]:
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

    def side_inputs(self, config: PretrainedConfig) -> dict[str, int]:
        """Per-layer inputs a span needs from the client besides hidden states: name -> feature size.

        Each arrives as a tensor [batch, tokens, end - start, size] (the span's own layers), in the hidden
        states' dtype; the client computes all layers' values with :meth:`ClientPart.side_inputs`.
        """
        return {}

    def client_side_inputs(self, client: ClientPart, input_ids: torch.Tensor, hidden: torch.Tensor) -> dict:
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
        source = TensorSource(path, self.base_prefix)
        model = self._skeleton(config, dtype, device="cpu")
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()  # skipped by no_init_weights; the LM head must be the embedding matrix
        expected = model.state_dict()
        state = {name: source.read(name) for name in expected if name in source}
        missing = [name for name in model.load_state_dict(state, strict=False).missing_keys]
        missing = [name for name in missing if not _is_tied(model, name)]
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
    ) -> BlockSpan:
        problem = span_problem(start, end, (0, self.num_blocks(config)), self.allowed_cuts(config))
        if problem:
            raise ValueError(problem)
        skeleton = _meta_skeleton(config)
        config = self._prepared_config(config, skeleton)
        source = TensorSource(path, self.base_prefix)
        layer_cls = self.decoder_layer_class(config)
        layers = []
        for index in range(start, end):
            prefix = f"{self.layer_prefix}{index}."
            state = {name[len(prefix) :]: source.read(name) for name in source.names(prefix)}
            layer = self._layer_from_state(
                layer_cls, config, index, self.convert_layer_state(config, index, state)
            )
            layers.append(layer.to(device=device, dtype=dtype))
        span = BlockSpan(self, config, start, end, layers, self.make_rotary(config, skeleton))
        return span.to(device=device).eval()

    def convert_layer_state(
        self, config: PretrainedConfig, index: int, state: dict[str, torch.Tensor]
    ) -> dict:
        """Map a checkpoint's per-layer tensor names to the layer module's (identity unless overridden)."""
        return state

    def _layer_from_state(
        self, layer_cls: type, config: PretrainedConfig, index: int, state: dict
    ) -> nn.Module:
        # Built on the meta device and given the checkpoint tensors themselves: no init, no second copy
        with torch.device("meta"):
            layer = self.make_layer(layer_cls, config, index)
        layer.load_state_dict(state, strict=True, assign=True)
        if any(t.is_meta for t in layer.buffers()):
            # this layer computes buffers in __init__ that are not in the checkpoint: build it for real
            with no_init_weights():
                layer = self.make_layer(layer_cls, config, index)
            layer.load_state_dict(state, strict=True)
        return layer

    def make_layer(self, layer_cls: type, config: PretrainedConfig, index: int) -> nn.Module:
        return layer_cls(config, layer_idx=index)

    def decoder_layer_class(self, config: PretrainedConfig) -> type:
        lm_cls = _causal_lm_class(config)
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
        return type(_get_path(skeleton, self.rotary))(config=config)

    def _skeleton(self, config: PretrainedConfig, dtype: torch.dtype, device: str) -> nn.Module:
        """The family's own CausalLM with zero decoder layers: exactly the client's modules."""
        with no_init_weights(), torch.device(device):
            return AutoModelForCausalLM.from_config(_zero_layer_config(config), dtype=dtype)

    def _prepared_config(self, config: PretrainedConfig, skeleton: nn.Module) -> PretrainedConfig:
        """A copy with the attention / experts implementations transformers itself would pick."""
        config = copy.deepcopy(config)
        for attr in ("_attn_implementation", "_experts_implementation"):
            if getattr(config, attr, None) is None and getattr(skeleton.config, attr, None) is not None:
                setattr(config, attr, getattr(skeleton.config, attr))
        return config

    # ---- running (client) ------------------------------------------------------------------------
    def embed(self, client: ClientPart, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hidden_from_embeds(client, client.model.get_input_embeddings()(input_ids))

    def hidden_from_embeds(self, client: ClientPart, embeds: torch.Tensor) -> torch.Tensor:
        """What the transformers model does to ``inputs_embeds`` before its first block (identity for
        most; BLOOM applies its embedding LayerNorm; Gemma's sqrt(hidden) scale lives in its embedding
        module, so given embeddings are used as they are, exactly as transformers does)."""
        return embeds

    def logits(self, client: ClientPart, hidden: torch.Tensor) -> torch.Tensor:
        hidden = _get_path(client.model, self.final_norm)(hidden)
        logits = client.model.get_output_embeddings()(hidden)
        cap = getattr(client.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ---- running (span) --------------------------------------------------------------------------
    def span_inputs(
        self,
        span: BlockSpan,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        kv: Any,
    ) -> SpanInputs:
        inputs = SpanInputs(position_ids=position_ids)
        first_of_type: dict[str, int] = {}
        for index in range(span.start, span.end):  # size each mask against a layer that holds a cache
            if self.owns_kv(span.config, index):
                first_of_type.setdefault(self.layer_type(span.config, index), index)
        for kind, index in first_of_type.items():
            make_mask = create_sliding_window_causal_mask if kind == SLIDING else create_causal_mask
            inputs.masks[kind] = make_mask(
                config=span.config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                cache=kv,
                position_ids=position_ids,
                layer_idx=index,
            )
            if span.rotary is not None:
                if self.rotary_takes_layer_type(span.config):
                    inputs.position_embeddings[kind] = span.rotary(hidden, position_ids, kind)
                else:
                    inputs.position_embeddings[kind] = span.rotary(hidden, position_ids)
        return inputs

    def run_layer(
        self, span: BlockSpan, layer: nn.Module, index: int, hidden: torch.Tensor, inputs: SpanInputs, kv: Any
    ) -> torch.Tensor:
        kind = self.layer_type(span.config, index)
        out = layer(
            hidden,
            attention_mask=inputs.masks[kind],
            position_embeddings=inputs.position_embeddings.get(kind),
            position_ids=inputs.position_ids,
            cache=kv,
            use_cache=kv is not None,
        )
        return out[0] if isinstance(out, tuple) else out

    def new_kv(self, config: PretrainedConfig) -> Any:
        return DynamicCache(config=config)


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

    def side_inputs(self, input_ids: torch.Tensor | None, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-layer inputs for all blocks, [batch, tokens, num_blocks, size] each (empty for most families).

        ``hidden`` is :meth:`embed`'s output for ``input_ids`` (or :meth:`hidden_from_embeds`'s for given
        embeddings, with ``input_ids=None``). Send span ``a:b`` the slice ``[:, :, a:b]``.
        """
        return self.family.client_side_inputs(self, input_ids, hidden)


class BlockSpan(nn.Module):
    """Decoder layers ``start:end`` of one model, runnable on their own with or without a KV cache."""

    def __init__(
        self,
        family: ModelFamily,
        config: PretrainedConfig,
        start: int,
        end: int,
        layers: list[nn.Module],
        rotary: nn.Module | None,
    ) -> None:
        super().__init__()
        self.family = family
        self.config = config
        self.start = start
        self.end = end
        self.layers = nn.ModuleList(layers)
        self.rotary = rotary

    def sub_span(self, start: int, end: int) -> BlockSpan:
        """Blocks start:end of this span, sharing its modules (a server serving part of what it holds)."""
        problem = span_problem(
            start, end, (self.start, self.end), self.family.allowed_cuts(self.config), "this span"
        )
        if problem:
            raise ValueError(problem)
        if (start, end) == (self.start, self.end):
            return self
        layers = list(self.layers)[start - self.start : end - self.start]
        return BlockSpan(self.family, self.config, start, end, layers, self.rotary)

    def new_cache(self, batch_size: int, max_length: int) -> SpanCache:
        return SpanCache(self.family.new_kv(self.config), batch_size, max_length, range(self.start, self.end))

    def cache_bytes(self, batch_size: int, max_length: int) -> int:
        itemsize = next(self.layers.parameters()).element_size()
        total = 0
        for index in range(self.start, self.end):
            if not self.family.owns_kv(self.config, index):
                continue
            kv_heads, head_dim = self.family.kv_shape(self.config, index)
            length = max_length
            if self.family.layer_type(self.config, index) == SLIDING and self.config.sliding_window:
                length = min(max_length, self.config.sliding_window)
            total += 2 * batch_size * kv_heads * head_dim * length * itemsize
        return total

    def forward(
        self,
        hidden: torch.Tensor,
        *,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: SpanCache | None = None,
        side_inputs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        batch, length = hidden.shape[:2]
        past = cache.length if cache is not None else 0
        _check_inputs(self, hidden, position_ids, attention_mask, cache, past)
        side_inputs = _checked_side_inputs(self, hidden, side_inputs or {})
        kv = cache.kv if cache is not None else None
        inputs = self.family.span_inputs(self, hidden, position_ids, attention_mask, kv)
        inputs.side = side_inputs
        for index, layer in zip(range(self.start, self.end), self.layers, strict=True):
            hidden = self.family.run_layer(self, layer, index, hidden, inputs, kv)
        if cache is not None:
            cache.length += length
        return hidden


def _check_inputs(
    span: BlockSpan,
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: SpanCache | None,
    past: int,
) -> None:
    if hidden.ndim != 3 or hidden.shape[-1] != span.config.hidden_size:
        raise ValueError(
            f"hidden states must be [batch, tokens, {span.config.hidden_size}], got {list(hidden.shape)}"
        )
    batch, length = hidden.shape[:2]
    if position_ids.ndim != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != length:
        raise ValueError(f"position_ids must be [{batch} or 1, {length}], got {list(position_ids.shape)}")
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, past + length):
        raise ValueError(
            f"attention_mask must be [batch, past+tokens] = [{batch}, {past + length}], "
            f"got {list(attention_mask.shape)}"
        )
    if cache is not None:
        if cache.batch_size != batch:
            raise ValueError(f"this cache was made for batch size {cache.batch_size}, got {batch}")
        if past + length > cache.max_length:
            raise ValueError(
                f"the session would hold {past + length} tokens but its cache was made for {cache.max_length}; "
                "open the session with a larger max_length"
            )


def _checked_side_inputs(span: BlockSpan, hidden: torch.Tensor, given: dict) -> dict[str, torch.Tensor]:
    wanted = span.family.side_inputs(span.config)
    if set(given) != set(wanted):
        raise ValueError(f"this span needs side inputs {sorted(wanted)}, got {sorted(given)}")
    for name, size in wanted.items():
        shape = (*hidden.shape[:2], span.end - span.start, size)
        if tuple(given[name].shape) != shape:
            raise ValueError(f"side input {name!r} must be {list(shape)}, got {list(given[name].shape)}")
    return given


def past_length(span: BlockSpan, kv: Any) -> int:
    """Tokens already in the span's cache. Ask the span's own first layer: layers before it are empty here."""
    return kv.get_seq_length(span.start) if kv is not None else 0


def fuse_experts(
    state: dict[str, torch.Tensor], experts: str, gate: str, up: str, down: str
) -> dict[str, torch.Tensor]:
    """Stack per-expert checkpoint matrices into transformers 5's fused 3-D expert parameters.

    Hub checkpoints store ``{experts}.{e}.{gate|up|down}.weight``; transformers 5 modules hold
    ``{experts}.gate_up_proj`` [E, 2I, H] (gate rows then up rows) and ``{experts}.down_proj`` [E, H, I].
    A checkpoint already in the fused layout passes through unchanged.
    """
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


def _causal_lm_class(config: PretrainedConfig) -> type:
    mapping = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING
    try:
        return mapping[type(config)]
    except KeyError:
        raise TypeError(f"transformers has no causal LM for model_type {config.model_type!r}") from None


def _meta_skeleton(config: PretrainedConfig) -> nn.Module:
    """The model with zero layers on the meta device (no memory): to learn its classes and settings."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")  # 0-layer tables
        return AutoModelForCausalLM.from_config(_zero_layer_config(config))


def _zero_layer_config(config: PretrainedConfig) -> PretrainedConfig:
    """The same config with no decoder layers: builds only embeddings, norm, head and rotary cheaply."""
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = 0
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = []
    return cfg


def _get_path(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _is_tied(model: nn.Module, name: str) -> bool:
    """True when parameter ``name`` shares its storage with another parameter (e.g. a tied LM head)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return any(other != name and params[other] is params[name] for other in params)
