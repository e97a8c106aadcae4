"""Distributed generation equals local transformers, token for token (fp32, greedy)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .conftest import FAMILY_CONFIGS


def reference(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def left_padded(lengths: list[int], vocab: int = 128, pad: int = 0, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(1, vocab, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_family_greedy_matches_transformers(family, tiny_models, family_servers, remote_model):
    family_servers[family]
    folder = tiny_models[family]
    model, ref = remote_model(folder), reference(folder)
    ids = torch.randint(1, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
        # given embeddings go through what transformers does with them (BLOOM: its embedding LayerNorm;
        # Gemma: no sqrt(hidden) scaling, that lives in the embedding module). Gemma 4 recovers the
        # token ids from exact embeddings for its per-layer inputs, so it gets exact ones.
        if family == "gemma4":
            embeds = ref.get_input_embeddings()(ids)
        else:
            embeds = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(1))
        got_logits, want_logits = model(inputs_embeds=embeds).logits, ref(inputs_embeds=embeds).logits
        torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=0)
        got = model.generate(ids, max_new_tokens=12, do_sample=False)
        want = ref.generate(ids, max_new_tokens=12, do_sample=False)
    assert got.tolist() == want.tolist()

    ids, mask = left_padded([7, 3, 5])
    with torch.no_grad():
        got = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert got.tolist() == want.tolist()

    if family == "gemma4":
        # the second server's per-layer inputs rode along with the first server's push
        with torch.no_grad(), model.inference_session(max_length=16) as session:
            ids = ids[:1, -4:]
            got = model.generate(ids, max_new_tokens=5, do_sample=False)
            second = session.stats()[1]
        assert got.tolist() == ref.generate(ids, max_new_tokens=5, do_sample=False).tolist()
        assert second["computed_from"] == {"client": 0, "push": 5} and second["sent_by_client"] == 0
        # gradients also flow back into the per-layer inputs the servers used
        _assert_gradients_match(model, ref, ids)


def _assert_gradients_match(model, ref, ids) -> None:
    embeds = ref.get_input_embeddings()(ids).detach()
    mine = embeds.clone().requires_grad_(True)
    theirs = embeds.clone().requires_grad_(True)
    model(inputs_embeds=mine, labels=ids).loss.backward()
    ref(inputs_embeds=theirs, labels=ids).loss.backward()
    torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-5, rtol=1e-4)


def test_sampling_matches_transformers_with_the_same_seed(tiny_models, family_servers, remote_model):
    family_servers["llama"]
    folder = tiny_models["llama"]
    model, ref = remote_model(folder), reference(folder)
    ids = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=10, do_sample=True, top_k=20, temperature=0.8)
    with torch.no_grad():
        torch.manual_seed(7)
        got = model.generate(ids, **kwargs)
        torch.manual_seed(7)
        want = ref.generate(ids, **kwargs)
    assert got.tolist() == want.tolist()


def test_inference_session_keeps_the_cache_across_calls(tiny_models, family_servers, remote_model):
    family_servers["llama"]
    folder = tiny_models["llama"]
    model, ref = remote_model(folder), reference(folder)
    ids = torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=8, do_sample=False)
        with model.inference_session(max_length=32) as session:
            first = model.generate(ids, max_new_tokens=4, do_sample=False)
            assert session.position == 6 + 3  # the last generated token is not fed back yet
            second = model.generate(first, max_new_tokens=4, do_sample=False)  # continues, no re-prefill
            assert session.position == 6 + 7
    assert second.tolist() == want.tolist()


def test_session_length_limit_is_a_clear_error(tiny_models, family_servers, remote_model):
    family_servers["llama"]
    model = remote_model(tiny_models["llama"])
    ids = torch.randint(1, 128, (1, 6))
    with model.inference_session(max_length=8) as _, torch.no_grad():
        with pytest.raises(ValueError, match="max_length=8"):
            model.generate(ids, max_new_tokens=8, do_sample=False)


def test_backward_through_the_swarm_matches_local_gradients(tiny_models, family_servers, remote_model):
    family_servers["llama"]
    folder = tiny_models["llama"]
    model, ref = remote_model(folder), reference(folder)
    ids = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(4))
    _assert_gradients_match(model, ref, ids)


@pytest.mark.slow
def test_smollm2_batch_of_four_matches_transformers(smollm2, smollm2_servers, remote_model):
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = [
        "The capital of France is",
        "Hi",
        "A distributed hash table stores keys across many machines, and",
        "One, two, three,",
    ]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    model, ref = remote_model(smollm2), reference(smollm2)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        got = model.generate(**batch, **kwargs)
        want = ref.generate(**batch, **kwargs)
    assert got.tolist() == want.tolist()
    assert "Paris" in tokenizer.decode(got[0, batch["input_ids"].shape[1] :])
