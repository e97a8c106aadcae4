"""The public client: a transformers model whose blocks run on the swarm.

``AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[...])`` loads only the client's
share of the checkpoint (embeddings, final norm, LM head), joins the swarm, and returns a
``PreTrainedModel`` + ``GenerationMixin``: its forward embeds locally, sends hidden states through a
chain of servers, and computes logits locally, so transformers' own ``generate`` works unchanged.

``generate`` keeps server-side KV caches in an inference session; the transformers ``Cache`` it sees
(:class:`RemoteCache`) only tracks how many tokens the servers hold.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from bloombee_core.client.handle import InferenceSessionHandle, RemoteCache
from bloombee_core.client.membership import SwarmMembership
from bloombee_core.client.pipeline import (
    PipelineStats,
    Size,
    check_size,
    generate_micro_batches,
    micro_batch_size,
)
from bloombee_core.client.remote_blocks import remote_blocks
from bloombee_core.client.swarm_client import SwarmClient, swarm_client_for
from bloombee_core.client.tunable import Tunable
from bloombee_core.compression import Compressor

if TYPE_CHECKING:
    from torch import nn

    from bloombee_core.model import ClientPart
    from bloombee_core.registry import PluginSet
    from bloombee_core.transport import Transport
    from bloombee_core.tuning import TuningMethod


class DistributedModelForCausalLM(Tunable, PreTrainedModel, GenerationMixin):
    config_class = PretrainedConfig
    base_model_prefix = "client"
    main_input_name = "input_ids"
    _supports_cache_class = True
    # the client has no attention layers: any implementation the config names is fine here
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # ... nor experts (transformers would otherwise look for a decorator in this module's source)
    _can_set_experts_implementation_cached_value = True
    micro_batch: Size = "auto"  # rows per micro-batch of a batched generate (docs/pipeline.md)
    prefill_chunk: Size = "auto"  # tokens per chunk of a long prefill; 0: never cut

    def __init__(
        self,
        config: PretrainedConfig,
        client: ClientPart,
        swarm: SwarmClient,
        membership: SwarmMembership,
        folder: Path | None = None,
        plugins: PluginSet | None = None,
    ) -> None:
        super().__init__(config)
        self.client = client
        self.swarm = swarm
        self.folder = folder  # the local checkpoint folder (drafters load from it)
        self.plugins = plugins  # the registries it was loaded with (strategies pick drafters there)
        self.loop = membership.loop
        self._membership = membership
        self._sessions = threading.local()  # the active session is per thread: threads generate at once
        self.pipeline_stats = PipelineStats()
        self.tuning_method: TuningMethod | None = None  # what the client trains (model.tune)
        self.tuning_module: nn.Module | None = None

    @property
    def _session(self) -> InferenceSessionHandle | None:
        """The inference session active in this thread (``inference_session``), if any."""
        return getattr(self._sessions, "active", None)

    @_session.setter
    def _session(self, session: InferenceSessionHandle | None) -> None:
        self._sessions.active = session

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.client.model.get_input_embeddings()

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.client.model.get_output_embeddings()

    def _init_weights(self, module: torch.nn.Module) -> None:  # weights come from the checkpoint only
        pass

    @contextlib.contextmanager
    def inference_session(self, max_length: int, trees: bool = False) -> Iterator[InferenceSessionHandle]:
        """Keep server-side KV caches for up to ``max_length`` tokens across ``generate``/forward calls;
        with ``trees``, steps may be token trees (speculative decoding)."""
        if self._session is not None:
            raise RuntimeError("an inference session is already active on this model in this thread")
        session = InferenceSessionHandle(self, max_length, trees)
        self._session = session
        try:
            yield session
        finally:
            self._session = None
            session.close()

    def generate(self, inputs: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``generate``; ``decoding=`` runs a decoding strategy instead (a plugin name, a
        ``{"name": ..., **options}`` map, or a strategy), e.g. ``decoding={"name": "speculative",
        "drafter": "prompt-lookup"}``; ``micro_batch=`` (rows, or ``"auto"``) splits a batch into
        micro-batches generated at once (:mod:`bloombee_core.client.pipeline`)."""
        decoding = kwargs.pop("decoding", None)
        if decoding is not None:
            from bloombee_core.decoding import DecodingStrategy

            if not isinstance(decoding, DecodingStrategy):
                if self.plugins is None:
                    raise ValueError("decoding= needs the model's plugins: load it with from_pretrained")
                decoding = self.plugins.create("decoding_strategies", decoding, "decoding")
            return decoding.generate(
                self, inputs if inputs is not None else kwargs.pop("input_ids"), *args, **kwargs
            )
        given = kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
        if given or self._session is not None:  # one cache or session is given: no micro-batches
            kwargs.pop("micro_batch", None)
            cache = {} if given else {"cache": RemoteCache(self._session)}
            return super().generate(inputs, *args, **cache, **kwargs)
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        size = micro_batch_size(self, ids, kwargs)  # pops micro_batch=; 0: the batch stays whole
        if size:
            return generate_micro_batches(self, ids, size, args, kwargs)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        length = ids.shape[1] if ids is not None else 1
        with self.inference_session(max_length=self._max_length(length, kwargs)) as session:
            return super().generate(inputs, *args, cache=RemoteCache(session), **kwargs)

    def _max_length(self, prompt_length: int, kwargs: dict[str, Any]) -> int:
        extra = self.tuning_method.extra_tokens() if self.tuning_method is not None else 0
        return extra + self._new_length(prompt_length, kwargs)

    def _new_length(self, prompt_length: int, kwargs: dict[str, Any]) -> int:
        config = kwargs.get("generation_config") or self.generation_config
        if kwargs.get("max_new_tokens") is not None:
            return prompt_length + int(kwargs["max_new_tokens"])
        if kwargs.get("max_length") is not None:
            return int(kwargs["max_length"])
        if config.max_new_tokens is not None:
            return prompt_length + int(config.max_new_tokens)
        return max(int(config.max_length or 20), prompt_length + 1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            hidden = self.client.embed(input_ids)
        else:  # what the transformers model does to given embeddings (BLOOM: its embedding LayerNorm)
            hidden = self.client.hidden_from_embeds(inputs_embeds)
        per_layer = self.client.per_layer_inputs(input_ids, hidden)  # Gemma 4 per-layer inputs; usually none
        session = cache.session if isinstance(cache, RemoteCache) else self._session
        past = session.position if session is not None else 0
        tuning, tuning_remote = self.tuning_method, None
        if tuning is not None and past == 0:  # prompt tuning: its prompts go first
            hidden, attention_mask, labels, position_ids = tuning.prepare_inputs(
                hidden, attention_mask, labels, position_ids
            )
        elif tuning is not None:  # later steps of a session: the prompts are in the servers' caches
            attention_mask, position_ids = tuning.continue_inputs(attention_mask, position_ids)
        if tuning is not None and session is None:
            tuning_remote = tuning.remote(hidden.shape[0])
        batch, length = hidden.shape[:2]
        if position_ids is None:
            # what the transformers model does without explicit positions (generate always passes them)
            position_ids = torch.arange(past, past + length, dtype=torch.long).unsqueeze(0).expand(batch, -1)
        if attention_mask is not None and attention_mask.ndim != 2:
            raise ValueError(
                f"attention_mask must be 2-D [batch, past+tokens], got shape {list(attention_mask.shape)}"
            )
        mask = attention_mask.to(torch.int64) if attention_mask is not None else None
        if mask is not None and bool(mask.all()):
            # No padding: the servers build the plain causal mask, exactly as transformers does for an
            # all-ones mask, and a decode step does not ship (and validate) a mask that grows every token.
            mask = None
        position_ids = position_ids.to(torch.int64)
        if session is not None:
            with torch.no_grad():
                detached = {name: t.detach() for name, t in per_layer.items()}
                out = session.step(hidden.detach(), position_ids, mask, detached).to(hidden.dtype)
        else:
            out = remote_blocks(self, position_ids, mask, hidden, per_layer, tuning_remote)
        if tuning is not None:
            own = tuning.head(out, attention_mask)  # a classifier's logits
            if own is not None:
                loss = tuning.loss(own, labels) if labels is not None else None
                return CausalLMOutputWithPast(loss=loss, logits=own)
            out = tuning.strip_outputs(out) if past == 0 else out  # the caller's own tokens only
        if isinstance(logits_to_keep, int):
            kept = out[:, -logits_to_keep:, :] if logits_to_keep else out
        else:
            kept = out[:, logits_to_keep, :]
        logits = self.client.logits(kept)
        loss = None
        if labels is not None:
            shifted = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def close(self) -> None:
        """Release what servers hold for this client (adapters) and leave the swarm (stops this client's
        DHT node and its p2pd)."""
        if self.tuning_method is not None:
            self.tuning_method.close(self)
        self._membership.close()


class AutoDistributedModelForCausalLM:
    """Factory: ``from_pretrained(path, initial_peers=[...], dtype=...)``."""

    @staticmethod
    def from_pretrained(
        path: str | Path,
        initial_peers: Sequence[str] = (),
        *,
        dtype: torch.dtype | str = torch.float32,
        plugins: PluginSet | None = None,
        transport: Transport | None = None,
        compressor: Compressor | None = None,
        family: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 6,
        micro_batch: Size = "auto",
        prefill_chunk: Size = "auto",
        tuning: str | dict[str, Any] | None = None,
        adapter: str | Path | None = None,
        **_: Any,
    ) -> DistributedModelForCausalLM:
        """``tuning``: attach a tuning method (``model.tune``); ``adapter``: a folder of trained parameters
        (a peft adapter folder): its method is read from the folder unless ``tuning`` names it."""
        from bloombee_core.dtypes import torch_dtype
        from bloombee_core.model import load_config
        from bloombee_core.model_files import resolve_model
        from bloombee_core.registry import load_plugins

        if isinstance(dtype, str):
            dtype = torch_dtype(dtype)
        if not initial_peers:
            raise ValueError(
                "initial_peers is empty: pass the multiaddr printed by `bloombee bootstrap` or a server"
            )
        folder = resolve_model(str(path))
        config = load_config(folder)
        plugins = plugins if plugins is not None else load_plugins()
        family_adapter = plugins.family_for(config, family)
        client_part = family_adapter.load_client(folder, config, dtype)
        transport = transport if transport is not None else plugins.create("transports", "hivemind")
        membership = SwarmMembership.join(transport, initial_peers)
        try:
            swarm = swarm_client_for(
                config, folder, family_adapter, transport, plugins, compressor, timeout, max_retries
            )
            model = DistributedModelForCausalLM(
                copy.deepcopy(config), client_part, swarm, membership, folder, plugins
            )
            model.micro_batch, model.prefill_chunk = (
                check_size(micro_batch, "micro_batch"),
                check_size(prefill_chunk, "prefill_chunk"),
            )
        except BaseException:
            membership.close()  # leave the swarm again: no DHT process or p2pd may outlive a failed load
            raise
        try:
            model.generation_config = GenerationConfig.from_pretrained(folder)
        except OSError:
            model.generation_config = GenerationConfig.from_model_config(model.config)
        if tuning is not None or adapter is not None:
            from bloombee_core.tuning import choice_of_folder

            try:
                model.tune(
                    tuning if tuning is not None else choice_of_folder(plugins, Path(adapter)), adapter
                )
            except BaseException:
                model.close()
                raise
        return model.eval()
