"""Decoding strategies drive transformers' own generate: greedy and seeded sampling match it exactly."""

from __future__ import annotations

import pytest
import torch
from bloombee_decoding import GreedyDecoding, SamplingDecoding
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, LlamaConfig

from bloombee_core.decoding import DecodingStrategy

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.tensor([[5, 17, 99, 3, 42]])


def generate(model: torch.nn.Module, prompt: torch.Tensor, strategy: DecodingStrategy) -> torch.Tensor:
    return strategy.generate(model, prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)


def test_greedy_equals_transformers_greedy(tiny_model: torch.nn.Module, prompt: torch.Tensor) -> None:
    reference = tiny_model.generate(
        prompt, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS
    )
    assert torch.equal(generate(tiny_model, prompt, GreedyDecoding()), reference)


def test_seeded_sampling_equals_transformers_sampling(
    tiny_model: torch.nn.Module, prompt: torch.Tensor
) -> None:
    options = SamplingDecoding.Options(temperature=1.3, top_p=0.9, top_k=40, seed=1234)
    torch.manual_seed(1234)
    reference = tiny_model.generate(
        prompt,
        do_sample=True,
        temperature=1.3,
        top_p=0.9,
        top_k=40,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
    )
    assert torch.equal(generate(tiny_model, prompt, SamplingDecoding(options)), reference)


def test_seed_makes_sampling_repeatable_and_leaves_global_rng_alone(
    tiny_model: torch.nn.Module, prompt: torch.Tensor
) -> None:
    strategy = SamplingDecoding(SamplingDecoding.Options(temperature=2.0, top_k=0, seed=7))
    torch.manual_seed(99)
    state_before = torch.random.get_rng_state()
    first = generate(tiny_model, prompt, strategy)
    assert torch.equal(torch.random.get_rng_state(), state_before)
    assert torch.equal(generate(tiny_model, prompt, strategy), first)
    # Another seed gives another continuation: the seed really drives the draws.
    other = SamplingDecoding(SamplingDecoding.Options(temperature=2.0, top_k=0, seed=8))
    assert not torch.equal(generate(tiny_model, prompt, other), first)
    # Sampling at high temperature must not collapse to the greedy continuation.
    assert not torch.equal(first, generate(tiny_model, prompt, GreedyDecoding()))


def test_unseeded_sampling_draws_from_the_callers_rng(
    tiny_model: torch.nn.Module, prompt: torch.Tensor
) -> None:
    strategy = SamplingDecoding(SamplingDecoding.Options(temperature=2.0))
    torch.manual_seed(5)
    first = generate(tiny_model, prompt, strategy)
    torch.manual_seed(5)
    assert torch.equal(generate(tiny_model, prompt, strategy), first)


def test_explicit_kwargs_win_over_the_strategy(tiny_model: torch.nn.Module, prompt: torch.Tensor) -> None:
    sampling = SamplingDecoding(SamplingDecoding.Options(temperature=2.0, seed=3))
    forced_greedy = sampling.generate(
        tiny_model, prompt, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS
    )
    assert torch.equal(forced_greedy, generate(tiny_model, prompt, GreedyDecoding()))


def test_sampling_options_are_validated() -> None:
    for bad in [{"temperature": 0}, {"top_p": 1.5}, {"top_k": -1}, {"seed": -3}, {"temprature": 1.0}]:
        with pytest.raises(ValidationError):
            SamplingDecoding.Options(**bad)
    assert GreedyDecoding().generation_kwargs() == {"do_sample": False, "num_beams": 1}
