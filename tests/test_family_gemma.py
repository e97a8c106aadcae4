"""Gemma 1/2/3/4 adapter: scaled embeddings, soft-caps, sliding windows, Gemma 4 per-layer inputs and KV sharing."""

from __future__ import annotations

import pytest
import torch
from bloombee_family_gemma import GemmaFamily
from family_helpers import (
    TINY,
    assert_bf16_parity,
    assert_family_parity,
    assert_span_reads_only_its_tensors,
    save_tiny,
)
from transformers import Gemma2Config, Gemma3TextConfig, Gemma4TextConfig, GemmaConfig

from bloombee_core.model import load_config

SMALL = dict(TINY, head_dim=16)
CONFIGS = {
    "gemma": lambda: GemmaConfig(**SMALL),
    # window 4 < prompt length, logit soft-caps on: every Gemma-2 specific path is exercised
    "gemma2": lambda: Gemma2Config(
        **SMALL, sliding_window=4, final_logit_softcapping=30.0, attn_logit_softcapping=50.0
    ),
    # sliding every other layer, local and global rope tables
    "gemma3_text": lambda: Gemma3TextConfig(**SMALL, sliding_window=4, sliding_window_pattern=2),
    # per-layer inputs from the client, wider global heads, the last two layers reuse earlier layers' KV
    "gemma4_text": lambda: Gemma4TextConfig(**GEMMA4),
    # Gemma 4 26B-A4B style: MoE block beside the MLP, keys double as values on global layers, soft-cap
    "gemma4_text_moe": lambda: Gemma4TextConfig(
        **GEMMA4,
        enable_moe_block=True,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=32,
        attention_k_eq_v=True,
        num_global_key_value_heads=1,
        final_logit_softcapping=30.0,
    ),
}
# layers 2 (sliding) and 3 (full) store KV that layers 4 (sliding) and 5 (full) reuse: cuts 3, 4, 5 are forbidden
GEMMA4 = dict(
    SMALL,
    num_hidden_layers=6,
    global_head_dim=32,
    sliding_window=4,
    layer_types=["sliding_attention", "full_attention"] * 3,
    hidden_size_per_layer_input=8,
    vocab_size_per_layer_input=128,
    num_kv_shared_layers=2,
)
CUTS = {"gemma4_text": [0, 1, 2, 6], "gemma4_text_moe": [0, 1, 2, 6]}


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def tiny_gemma(request, tmp_path_factory):
    return save_tiny(CONFIGS[request.param](), tmp_path_factory.mktemp(request.param))


def _cuts(path) -> list[int]:
    return CUTS.get(path.name.rstrip("0123456789"), [0, 1, 3, 5])


def test_split_equals_transformers(tiny_gemma):
    assert_family_parity(GemmaFamily(), tiny_gemma, _cuts(tiny_gemma))


def test_bf16_split_matches_transformers_bf16(tiny_gemma):
    assert_bf16_parity(GemmaFamily(), tiny_gemma, _cuts(tiny_gemma)[::2] + [_cuts(tiny_gemma)[-1]])


def test_span_reads_only_its_tensors(tiny_gemma, monkeypatch):
    assert_span_reads_only_its_tensors(GemmaFamily(), tiny_gemma, monkeypatch, 1, _cuts(tiny_gemma)[2])


def test_gemma4_is_never_cut_between_a_kv_source_and_its_consumers():
    config = Gemma4TextConfig(**GEMMA4)
    assert config.kv_sharing_modes == [None, None, "store", "store", "reuse", "reuse"]
    assert GemmaFamily().allowed_cuts(config) == [0, 1, 2, 6]


def test_gemma4_forbidden_span_and_missing_per_layer_inputs_are_clear_errors(tmp_path_factory):
    path = save_tiny(Gemma4TextConfig(**GEMMA4), tmp_path_factory.mktemp("gemma4_errors"))
    config = load_config(path)
    with pytest.raises(ValueError, match="start and end only at blocks \\[0, 1, 2, 6\\]"):
        GemmaFamily().load_span(path, config, 0, 4, torch.float32)
    span = GemmaFamily().load_span(path, config, 0, 2, torch.float32)
    hidden = torch.randn(1, 3, config.hidden_size)
    with pytest.raises(ValueError, match="needs per-layer inputs \\['per_layer_inputs'\\]"):
        span(hidden, position_ids=torch.arange(3)[None])
    with pytest.raises(ValueError, match="must be \\[1, 3, 2, 8\\]"):
        span(
            hidden,
            position_ids=torch.arange(3)[None],
            per_layer_inputs={"per_layer_inputs": torch.zeros(1, 3, 6, 8)},
        )
