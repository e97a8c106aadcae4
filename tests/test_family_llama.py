"""LLaMA / Mistral adapter: split execution equals transformers (tiny random models, fp32 and bf16)."""

from __future__ import annotations

import pytest
import torch
from bloombee_family_llama import LlamaFamily
from family_helpers import (
    BF16_ATOL,
    TINY,
    SplitModel,
    assert_cached_decode_parity,
    assert_family_parity,
    assert_generate_parity,
    assert_span_reads_only_its_tensors,
    load_reference,
    prompts,
    save_tiny,
    tensor_reads,
)
from transformers import LlamaConfig, MistralConfig

from bloombee_core.model import load_config

CUTS = [0, 1, 3, 5]  # an uneven split: 0:1, 1:3, 3:5


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return save_tiny(LlamaConfig(**TINY, tie_word_embeddings=False), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory):
    return save_tiny(LlamaConfig(**TINY, tie_word_embeddings=True), tmp_path_factory.mktemp("llama_tied"))


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory):
    # a window shorter than the prompts so the sliding-window mask and cache trimming really matter
    config = MistralConfig(**TINY, sliding_window=4, tie_word_embeddings=False)
    return save_tiny(config, tmp_path_factory.mktemp("mistral"))


def test_llama_split_equals_transformers(tiny_llama):
    assert_family_parity(LlamaFamily(), tiny_llama, CUTS)


def test_llama_greedy_generation_of_16_tokens_is_identical(tiny_llama):
    ids, mask = prompts(TINY["vocab_size"], batch=1, length=6, seed=3)
    assert_generate_parity(
        load_reference(tiny_llama), SplitModel(LlamaFamily(), tiny_llama, CUTS), ids, mask, 16
    )


def test_llama_tied_embeddings_split_equals_transformers(tiny_llama_tied):
    split = SplitModel(LlamaFamily(), tiny_llama_tied, CUTS)
    head = split.client.model.get_output_embeddings().weight
    assert head is split.client.model.get_input_embeddings().weight
    assert_family_parity(LlamaFamily(), tiny_llama_tied, CUTS)


def test_mistral_sliding_window_split_equals_transformers(tiny_mistral):
    assert_family_parity(LlamaFamily(), tiny_mistral, CUTS)


def test_bf16_split_matches_transformers_bf16(tiny_llama):
    reference = load_reference(tiny_llama, torch.bfloat16)
    split = SplitModel(LlamaFamily(), tiny_llama, CUTS, dtype=torch.bfloat16)
    ids, mask = prompts(TINY["vocab_size"], batch=2, length=7)
    assert_cached_decode_parity(reference, split, ids, mask, steps=16, atol=BF16_ATOL)


def test_span_reads_only_its_own_tensors(tiny_llama, monkeypatch):
    assert_span_reads_only_its_tensors(LlamaFamily(), tiny_llama, monkeypatch)
    with tensor_reads(monkeypatch) as read:
        LlamaFamily().load_client(tiny_llama, load_config(tiny_llama), torch.float32)
    assert sorted(read) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]


def test_backward_through_span_matches_transformers(tiny_llama):
    config = load_config(tiny_llama)
    family = LlamaFamily()
    client = family.load_client(tiny_llama, config, torch.float32)
    spans = [
        family.load_span(tiny_llama, config, a, b, torch.float32)
        for a, b in zip(CUTS[:-1], CUTS[1:], strict=True)
    ]
    reference = load_reference(tiny_llama)
    ids, mask = prompts(TINY["vocab_size"], batch=2, length=6)
    position_ids = torch.arange(6).expand(2, 6)

    hidden = client.embed(ids)
    for span in spans:
        hidden = span(hidden, position_ids=position_ids, attention_mask=mask)
    client.logits(hidden).square().mean().backward()
    reference(input_ids=ids, attention_mask=mask).logits.square().mean().backward()

    got = spans[1].layers[0].self_attn.q_proj.weight.grad
    want = reference.model.layers[1].self_attn.q_proj.weight.grad
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-4)


def test_cache_limits_and_accounting(tiny_llama):
    config = load_config(tiny_llama)
    span = LlamaFamily().load_span(tiny_llama, config, 1, 3, torch.float32)
    cache = span.new_cache(batch_size=2, max_length=8)
    hidden = torch.randn(2, 8, config.hidden_size)
    positions = torch.arange(8).expand(2, 8)
    with torch.no_grad():
        span(hidden, position_ids=positions, cache=cache)
    assert cache.length == 8
    assert 0 < cache.nbytes() <= span.cache_bytes(batch_size=2, max_length=8)
    with pytest.raises(ValueError, match="cache was made for 8"):
        span(hidden[:, :1], position_ids=positions[:, :1] + 8, cache=cache)
    with pytest.raises(ValueError, match="hidden states must be"):
        span(torch.randn(2, 3, 7), position_ids=positions[:, :3])


def test_bad_span_is_a_clear_error(tiny_llama):
    config = load_config(tiny_llama)
    with pytest.raises(ValueError, match="out of range: the model holds blocks 0:5"):
        LlamaFamily().load_span(tiny_llama, config, 3, 9, torch.float32)


def test_sub_span_equals_a_span_loaded_for_those_blocks(tiny_llama):
    config = load_config(tiny_llama)
    family = LlamaFamily()
    whole = family.load_span(tiny_llama, config, 1, 5, torch.float32)
    part = whole.sub_span(2, 4)
    assert part.layers[0] is whole.layers[1]
    loaded = family.load_span(tiny_llama, config, 2, 4, torch.float32)
    hidden = torch.randn(1, 4, config.hidden_size)
    positions = torch.arange(4)[None]
    with torch.no_grad():
        assert torch.equal(part(hidden, position_ids=positions), loaded(hidden, position_ids=positions))
    with pytest.raises(ValueError, match="blocks 0:2 are out of range: this span holds blocks 1:5"):
        whole.sub_span(0, 2)
