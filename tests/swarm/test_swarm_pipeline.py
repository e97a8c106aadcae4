"""The micro-batch pipeline and chunked prefill give exactly the tokens of local transformers (fp32, greedy),
and they really ran: several sessions and steps in flight at once, a prefill cut into chunks."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from .conftest import FAMILY_CONFIGS
from .test_swarm_generation import left_padded

LENGTHS = [7, 3, 5, 9, 4]  # B=5, left-padded


def reference(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@contextlib.contextmanager
def chunked(model, chunk):
    old, model.prefill_chunk = model.prefill_chunk, chunk
    try:
        yield
    finally:
        model.prefill_chunk = old


def greedy(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, **kwargs
        )


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_micro_batches_and_chunked_prefill_match_transformers(
    family, tiny_models, family_servers, remote_model
):
    family_servers[family]
    folder = tiny_models[family]
    model, ref = remote_model(folder), reference(folder)
    ids, mask = left_padded(LENGTHS)
    want = greedy(ref, ids, mask).tolist()
    assert greedy(model, ids, mask, micro_batch=0).tolist() == want  # unsplit
    sizes = (1, 2, 3, 5) if family == "llama" else (2,)  # every size once, each family split once
    for size in sizes:
        model.pipeline_stats.reset()
        assert greedy(model, ids, mask, micro_batch=size).tolist() == want, f"micro_batch={size}"
        stats = model.pipeline_stats.as_dict()
        if size < len(LENGTHS):
            assert stats["runs"] == 1 and stats["most_sessions_at_once"] >= 2, stats
    # a long prompt cut into chunks that are all in flight at once, alone and with micro-batches
    long_ids, long_mask = left_padded([40, 33, 37], seed=4)
    want = greedy(ref, long_ids, long_mask).tolist()
    with chunked(model, 8):
        model.pipeline_stats.reset()
        assert greedy(model, long_ids, long_mask, micro_batch=0).tolist() == want
        assert model.pipeline_stats.as_dict()["most_chunks_at_once"] == 5
        if family == "llama":  # chunks and micro-batches together: the same code paths for every family
            assert greedy(model, long_ids, long_mask, micro_batch=2).tolist() == want


def test_chunked_prefill_leaves_the_cache_of_the_unsplit_one(tiny_models, family_servers, remote_model):
    family_servers["llama"]
    model = remote_model(tiny_models["llama"])
    ids = torch.randint(1, 128, (2, 30), generator=torch.Generator().manual_seed(8))
    nxt = torch.randint(1, 128, (2, 1), generator=torch.Generator().manual_seed(9))
    logits = []
    for chunk in (0, 7):
        with chunked(model, chunk), torch.no_grad(), model.inference_session(max_length=32):
            first = model(ids).logits
            logits.append((first, model(nxt).logits))  # the next step reads the cache the prefill left
    (a, a_next), (b, b_next) = logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(a_next, b_next, atol=1e-5, rtol=0)


def test_steps_of_micro_batches_overlap(tiny_models, family_servers, remote_model):
    family_servers["llama"]
    model = remote_model(tiny_models["llama"])
    ids, mask = left_padded([6] * 8, seed=6)
    model.pipeline_stats.reset()
    greedy(model, ids, mask, micro_batch=2)
    stats = model.pipeline_stats.as_dict()
    assert stats["most_sessions_at_once"] == 4
    assert stats["most_steps_at_once"] >= 2, stats  # several micro-batches' steps were in the swarm at once


def test_rows_stop_at_eos_as_in_transformers(tiny_models, family_servers, remote_model):
    family_servers["llama"]
    folder = tiny_models["llama"]
    model, ref = remote_model(folder), reference(folder)
    ids, mask = left_padded(LENGTHS, seed=5)
    plain = greedy(ref, ids, mask)
    eos = int(plain[1, ids.shape[1] + 2])  # row 1 stops after 3 new tokens; others when they meet it
    want = greedy(ref, ids, mask, eos_token_id=eos).tolist()
    for size in (2, 3):
        assert greedy(model, ids, mask, micro_batch=size, eos_token_id=eos).tolist() == want


def test_sampling_in_micro_batches(tiny_models, family_servers, remote_model):
    family_servers["llama"]
    model = remote_model(tiny_models["llama"])
    ids, mask = left_padded(LENGTHS, seed=7)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=20, micro_batch=2
        )
    assert out.shape == (5, ids.shape[1] + 6)
    assert out[:, : ids.shape[1]].tolist() == ids.tolist()
    with pytest.raises(ValueError, match="micro_batch=2 cannot split"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, num_beams=2, micro_batch=2)


def test_auto_keeps_a_single_sequence_whole(tiny_models, family_servers, remote_model):
    family_servers["llama"]
    model = remote_model(tiny_models["llama"])
    model.pipeline_stats.reset()
    with torch.no_grad():
        model.generate(torch.randint(1, 128, (1, 5)), max_new_tokens=3, do_sample=False)
    assert model.pipeline_stats.as_dict()["runs"] == 0
