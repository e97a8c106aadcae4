"""Parity harness for model-family tests: a tiny random model vs. the same model split into spans.

The template for a new family's test: build a tiny config, save a random model with ``save_tiny``,
then call ``assert_parity`` (prefill + 16 cached decode steps, greedy generation, left-padded batch).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    FalconConfig,
    Gemma2Config,
    Gemma4TextConfig,
    LlamaConfig,
    MixtralConfig,
    PretrainedConfig,
    Qwen3Config,
)

from bloombee_core.family import ModelFamily
from bloombee_core.model import BlockSpan, ClientPart, SpanCache, TensorSource, load_config

# Sizes shared by the tiny test models; each family test adds what its config needs.
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=5,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
# one tiny model per family (the swarm tests serve each; the tree tests run each's attention)
SMALL = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, max_position_embeddings=256)
FAMILY_CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL, intermediate_size=128, num_hidden_layers=4, num_key_value_heads=2),
    "bloom": lambda: BloomConfig(vocab_size=128, hidden_size=64, n_layer=4, n_head=4),
    "falcon": lambda: FalconConfig(
        **SMALL, num_hidden_layers=4, new_decoder_architecture=True, num_kv_heads=2
    ),
    "mixtral": lambda: MixtralConfig(
        **SMALL, intermediate_size=96, num_hidden_layers=4, num_key_value_heads=2, num_local_experts=4
    ),
    "qwen3": lambda: Qwen3Config(**SMALL, intermediate_size=128, num_hidden_layers=4, num_key_value_heads=2),
    "gemma2": lambda: Gemma2Config(
        **SMALL,
        intermediate_size=128,
        num_hidden_layers=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=4,
        final_logit_softcapping=30.0,
    ),
    # per-layer inputs from the client; layers 4 and 5 reuse the KV of layers 2 and 3 (cuts: 0, 1, 2, 6)
    "gemma4": lambda: Gemma4TextConfig(
        **SMALL,
        intermediate_size=128,
        num_hidden_layers=6,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * 3,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=128,
        num_kv_shared_layers=2,
    ),
}
FP32_ATOL = 1e-5
# bf16 runs compare against transformers also run in bf16. Both execute the same kernels in the same order,
# so in practice the logits agree exactly; the tolerance only leaves room for a different fusion/accumulation
# order in a future transformers or torch: bf16 keeps 8 mantissa bits (relative step 2**-8 ~ 0.004), and
# logits of the tiny models are O(1), so 1e-2 is about two bf16 steps, far below any real divergence
# (a wrong mask or position moves logits by ~0.1-1).
BF16_ATOL = 1e-2


def save_tiny(config: PretrainedConfig, folder: Path, seed: int = 0) -> Path:
    """Save a randomly initialised fp32 model for ``config`` into ``folder`` (safetensors + config)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    return folder


def client_and_two_spans(folder: Path) -> tuple[ClientPart, list[BlockSpan]]:
    """A saved model's client part and its blocks in two spans, cut at the allowed cut nearest the middle."""
    from bloombee_core import load_plugins

    config = load_config(folder)
    family = load_plugins().family_for(config)
    cuts = family.allowed_cuts(config)
    middle = cuts[len(cuts) // 2]
    client = family.load_client(folder, config, torch.float32)
    spans = [
        family.load_span(folder, config, a, b, torch.float32) for a, b in ((0, middle), (middle, cuts[-1]))
    ]
    return client, spans


def positions_like_generate(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids exactly as transformers ``generate`` computes them from a 2-D padding mask."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 1)


class SplitModel:
    """Client part + a chain of spans, run in one process: what the swarm computes, minus the network."""

    def __init__(self, family: ModelFamily, path: Path, cuts: list[int], dtype: torch.dtype = torch.float32):
        config = load_config(path)
        self.client: ClientPart = family.load_client(path, config, dtype)
        self.spans: list[BlockSpan] = [
            family.load_span(path, config, a, b, dtype) for a, b in zip(cuts[:-1], cuts[1:], strict=True)
        ]

    def new_caches(self, batch_size: int, max_length: int) -> list[SpanCache]:
        return [span.new_cache(batch_size, max_length) for span in self.spans]

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        caches: list[SpanCache] | None,
        send_mask: bool = True,
    ) -> torch.Tensor:
        """Logits for ``input_ids`` (the new tokens); ``attention_mask`` covers past + new tokens.

        ``send_mask=False`` gives the spans no mask (the no-padding shortcut a client may take).
        """
        length = input_ids.shape[1]
        position_ids = positions_like_generate(attention_mask)[:, -length:]
        hidden = self.client.embed(input_ids)
        per_layer = self.client.per_layer_inputs(
            input_ids, hidden
        )  # per-layer inputs (Gemma 4); usually empty
        for i, span in enumerate(self.spans):
            cache = caches[i] if caches is not None else None
            span_per_layer = {name: t[:, :, span.start : span.end] for name, t in per_layer.items()}
            hidden = span(
                hidden,
                position_ids=position_ids,
                attention_mask=attention_mask if send_mask else None,
                cache=cache,
                per_layer_inputs=span_per_layer,
            )
        return self.client.logits(hidden)

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int
    ) -> torch.Tensor:
        """Greedy decoding through the KV caches; returns prompt + new tokens like ``model.generate``."""
        caches = self.new_caches(input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
        tokens, mask = input_ids, attention_mask
        logits = self.forward(input_ids, mask, caches)
        for step in range(max_new_tokens):
            next_token = logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
            if step + 1 < max_new_tokens:
                logits = self.forward(next_token, mask, caches)
        return tokens


def load_reference(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _reference_step(model, input_ids, attention_mask, cache, send_mask=True):
    length = input_ids.shape[1]
    position_ids = positions_like_generate(attention_mask)[:, -length:]
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask if send_mask else None,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
    )
    return out.logits, out.cache


@torch.no_grad()
def assert_cached_decode_parity(
    reference: torch.nn.Module,
    split: SplitModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    steps: int = 16,
    atol: float = FP32_ATOL,
    send_mask: bool = True,
) -> None:
    """Prefill then ``steps`` single-token steps through the KV cache; logits equal at every step."""
    ref_logits, ref_cache = _reference_step(reference, input_ids, attention_mask, None, send_mask)
    caches = split.new_caches(input_ids.shape[0], input_ids.shape[1] + steps)
    logits = split.forward(input_ids, attention_mask, caches, send_mask)
    _assert_close(logits, ref_logits, atol, "prefill", attention_mask)
    mask = attention_mask
    for step in range(steps):
        token = ref_logits[:, -1].argmax(-1, keepdim=True)  # both sides decode the reference's token
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        ref_logits, ref_cache = _reference_step(reference, token, mask, ref_cache, send_mask)
        logits = split.forward(token, mask, caches, send_mask)
        _assert_close(logits, ref_logits, atol, f"decode step {step}", None)
    assert all(c.length == input_ids.shape[1] + steps for c in caches)


def _assert_close(got, want, atol, what, attention_mask) -> None:
    if attention_mask is not None:  # logits at padding positions are meaningless; compare real tokens only
        keep = attention_mask.bool()
        got, want = got[keep], want[keep]
    diff = (got.float() - want.float()).abs().max().item()
    assert diff <= atol, f"{what}: split logits differ from transformers by {diff:.3g} (tolerance {atol})"


def prompts(vocab_size: int, batch: int, length: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, length), generator=gen)
    return ids, torch.ones_like(ids)


def left_padded(vocab_size: int, lengths: list[int], pad_id: int = 0, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, vocab_size, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask


@torch.no_grad()
def assert_generate_parity(reference, split: SplitModel, input_ids, attention_mask, max_new_tokens: int = 16):
    want = reference.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        pad_token_id=0,
    )
    got = split.generate(input_ids, attention_mask, max_new_tokens)
    assert torch.equal(got, want), (
        f"greedy tokens differ:\n split {got.tolist()}\n transformers {want.tolist()}"
    )


def assert_family_parity(family: ModelFamily, path: Path, cuts: list[int]) -> None:
    """The whole fp32 contract for one tiny checkpoint: cached decode, padding, greedy generation."""
    config = load_config(path)
    reference = load_reference(path)
    split = SplitModel(family, path, cuts)
    ids, mask = prompts(config.vocab_size, batch=1, length=7)
    assert_cached_decode_parity(reference, split, ids, mask, steps=16)
    assert_cached_decode_parity(reference, split, ids, mask, steps=4, send_mask=False)
    ids, mask = left_padded(config.vocab_size, [5, 9, 3])
    assert_cached_decode_parity(reference, split, ids, mask, steps=4)
    assert_generate_parity(reference, split, ids, mask, max_new_tokens=8)


def assert_bf16_parity(family: ModelFamily, path: Path, cuts: list[int]) -> None:
    """bf16 split run vs transformers in bf16 (tolerance: see ``BF16_ATOL``)."""
    config = load_config(path)
    reference = load_reference(path, torch.bfloat16)
    split = SplitModel(family, path, cuts, dtype=torch.bfloat16)
    ids, mask = prompts(config.vocab_size, batch=2, length=7)
    assert_cached_decode_parity(reference, split, ids, mask, steps=8, atol=BF16_ATOL)


@contextmanager
def tensor_reads(monkeypatch) -> Iterator[list[str]]:
    """Record the name of every checkpoint tensor read inside the block (the reads really happen)."""
    read: list[str] = []
    original = TensorSource.read

    def recording_read(self, name):
        read.append(name)
        return original(self, name)

    monkeypatch.setattr(TensorSource, "read", recording_read)
    try:
        yield read
    finally:
        monkeypatch.setattr(TensorSource, "read", original)


def assert_span_reads_only_its_tensors(
    family: ModelFamily, path: Path, monkeypatch, start: int = 1, end: int = 3
) -> None:
    """Loading blocks start:end reads exactly those blocks' tensors, and nothing else."""
    source = TensorSource(path)
    wanted = sorted(name for i in range(start, end) for name in source.names(f"{family.layer_prefix}{i}."))
    assert wanted, f"no tensors under {family.layer_prefix}{start}. in {path}"
    with tensor_reads(monkeypatch) as read:
        family.load_span(path, load_config(path), start, end, torch.float32)
    assert sorted(read) == wanted
