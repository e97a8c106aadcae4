"""Several sessions' steps in one batched span forward give what each step gives alone, for every family.

Sessions differ in past length (one has not cached anything yet), batch size and left padding; the
sequences outgrow the sliding windows (Gemma 2/4, Mistral), so a sliding layer holds fewer keys than a
full one. Every decode step is computed both ways; outputs and the caches that follow must agree.
"""

from __future__ import annotations

import pytest
import torch
from family_helpers import (
    client_and_two_spans,
    positions_like_generate,
    save_tiny,
)
from test_tree import (
    CONFIGS,
)  # every family, and a Mistral sliding window, Falcon ALiBi, Gemma 2 soft-capping

from bloombee_core.model.batch import BatchItem, batched_forward, check_batch_item

ATOL = 1e-5  # fp32; a batched row is computed in a differently shaped batch than alone
# session -> rows of its prompt (0 = left padding); the last one starts with a single token
PROMPTS = [[[5, 9, 17, 3, 44, 8, 21]], [[0, 0, 61, 2, 90], [7, 1, 33, 12, 4]], [[19, 4, 6]], [[42]]]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def spans(request, tmp_path_factory):
    return client_and_two_spans(save_tiny(CONFIGS[request.param](), tmp_path_factory.mktemp(request.param)))


def items_for(client, spans, caches, tokens, masks) -> list[list[BatchItem]]:
    """Per span, per session: the step's inputs (hidden states filled in as the chain runs)."""
    out = []
    for span in spans:
        row = []
        for session, (ids, mask) in enumerate(zip(tokens, masks, strict=True)):
            hidden = client.embed(ids)
            per_layer = {
                k: v[:, :, span.start : span.end] for k, v in client.per_layer_inputs(ids, hidden).items()
            }
            positions = positions_like_generate(mask)[:, -ids.shape[1] :]
            row.append(BatchItem(caches[session][span.start], hidden, positions, mask, per_layer))
        out.append(row)
    return out


def run_alone(client, spans, caches, tokens, masks) -> list[torch.Tensor]:
    items = items_for(client, spans, caches, tokens, masks)
    hidden = [item.hidden for item in items[0]]
    for span, row in zip(spans, items, strict=True):
        hidden = [
            span(
                h,
                position_ids=i.position_ids,
                attention_mask=i.attention_mask,
                cache=i.cache,
                per_layer_inputs=i.per_layer,
            )
            for h, i in zip(hidden, row, strict=True)
        ]
    return [client.logits(h) for h in hidden]


def run_batched(client, spans, caches, tokens, masks) -> list[torch.Tensor]:
    items = items_for(client, spans, caches, tokens, masks)
    hidden = [item.hidden for item in items[0]]
    for span, row in zip(spans, items, strict=True):
        for item, h in zip(row, hidden, strict=True):
            item.hidden = h
        hidden = batched_forward(span, row)
    return [client.logits(h) for h in hidden]


@torch.no_grad()
def test_batched_steps_equal_steps_alone(spans):
    client, parts = spans
    caches = {
        name: [{s.start: s.new_cache(len(p), 32) for s in parts} for p in PROMPTS]
        for name in ("alone", "batched")
    }
    tokens = [torch.tensor(p) for p in PROMPTS[:-1]]
    masks = [(t != 0).long() for t in tokens]
    for name in caches:  # the first three sessions prefill alone; the last one joins at its first token
        prefilled = run_alone(client, parts, caches[name][:-1], tokens, masks)
    tokens = [logits[:, -1].argmax(-1, keepdim=True) for logits in prefilled]
    tokens.append(torch.tensor(PROMPTS[-1]))
    masks.append(torch.zeros(1, 0, dtype=torch.long))
    for step in range(8):
        masks = [torch.cat([m, torch.ones(m.shape[0], 1, dtype=torch.long)], dim=1) for m in masks]
        alone = run_alone(client, parts, caches["alone"], tokens, masks)
        batched = run_batched(client, parts, caches["batched"], tokens, masks)
        for got, want in zip(batched, alone, strict=True):
            torch.testing.assert_close(
                got, want, atol=ATOL, rtol=0, msg=lambda m, step=step: f"decode step {step}: {m}"
            )
        tokens = [logits[:, -1].argmax(-1, keepdim=True) for logits in alone]
    for alone_cache, batched_cache in zip(caches["alone"], caches["batched"], strict=True):
        for start, cache in alone_cache.items():
            assert batched_cache[start].length == cache.length
            for a, b in zip(cache._tensors(), batched_cache[start]._tensors(), strict=True):
                assert a.keys.shape == b.keys.shape
                torch.testing.assert_close(b.keys, a.keys, atol=ATOL, rtol=0)


@torch.no_grad()
def test_a_bad_step_is_refused_before_it_joins(spans):
    client, parts = spans
    span = parts[0]
    cache = span.new_cache(1, 8)
    hidden = client.embed(torch.tensor([[3, 4]]))
    per_layer = {
        k: v[:, :, span.start : span.end]
        for k, v in client.per_layer_inputs(torch.tensor([[3, 4]]), hidden).items()
    }
    good = BatchItem(cache, hidden, torch.tensor([[0, 1]]), None, per_layer)
    check_batch_item(span, good)
    with pytest.raises(ValueError, match="attention_mask"):
        check_batch_item(
            span,
            BatchItem(cache, hidden, torch.tensor([[0, 1]]), torch.ones(1, 5, dtype=torch.long), per_layer),
        )
    with pytest.raises(ValueError, match="max_length"):
        check_batch_item(
            span, BatchItem(span.new_cache(1, 1), hidden, torch.tensor([[0, 1]]), None, per_layer)
        )
    with pytest.raises(ValueError, match="token trees"):
        check_batch_item(
            span, BatchItem(span.new_cache(1, 8, trees=True), hidden, torch.tensor([[0, 1]]), None, per_layer)
        )


def server_parts(spans):
    """(client, span, compute, compute thread, step(ids, mask columns) -> a step's tensors)."""
    from bloombee_core.server.compute import ComputeThread, SpanCompute

    client, parts = spans
    span = parts[0]
    compute = SpanCompute(torch.device("cpu"), torch.float32, span.family.per_layer_input_sizes(span.config))

    def step(ids: list[int], mask_columns: int) -> dict[str, torch.Tensor]:
        tokens = torch.tensor([ids])
        hidden = client.embed(tokens)
        t = {
            "hidden": hidden,
            "position_ids": torch.arange(len(ids))[None],
            "attention_mask": torch.ones(1, mask_columns, dtype=torch.long),
        }
        t.update(client.per_layer_inputs(tokens, hidden))
        return t

    return client, span, compute, ComputeThread(), step


def test_the_batcher_shares_a_forward_and_refuses_a_bad_step_alone(spans):
    """Three sessions' steps due at once: two share one forward, the malformed one fails on its own."""
    import asyncio

    from bloombee_core.server.batching import StepBatcher
    from bloombee_core.server.checks import RequestError
    from bloombee_core.server.sessions import Session

    client, span, compute, thread, step = server_parts(spans)

    async def main():
        sessions = {str(i): Session(str(i), span, span.new_cache(1, 16), 1, 16, 0) for i in range(3)}
        batcher = StepBatcher(compute, thread, sessions, wait_ms=50)
        steps = [step([5, 7], 2), step([9, 4], 2), step([3, 3], 5)]  # the last one's mask is too wide
        results = await asyncio.gather(
            *(batcher.step(s, t) for s, t in zip(sessions.values(), steps, strict=True)),
            return_exceptions=True,
        )
        return sessions, batcher, steps, results

    with torch.no_grad():
        sessions, batcher, steps, results = asyncio.run(main())
        thread.shutdown()
        assert isinstance(results[2], RequestError) and "attention_mask" in str(results[2])
        assert batcher.stats() == {"batched_steps": 2, "batched_forwards": 1, "largest_batch": 2}
        for result, t in zip(results[:2], steps[:2], strict=True):
            want = compute.step(span, span.new_cache(1, 16), t)
            torch.testing.assert_close(result, want, atol=ATOL, rtol=0)
        assert [s.cache.length for s in sessions.values()] == [2, 2, 0]


def test_micro_batches_of_one_pipeline_are_not_batched_together(spans):
    """Two sessions of one client's micro-batch pipeline (one group) and one of another client, all due
    at once: the other client's step shares a forward with one of them, never the two siblings."""
    import asyncio

    from bloombee_core.server.batching import StepBatcher
    from bloombee_core.server.sessions import Session

    client, span, compute, thread, step = server_parts(spans)

    async def main():
        groups = ["pipe", "pipe", None]
        sessions = {
            str(i): Session(str(i), span, span.new_cache(1, 16), 1, 16, 0, group=g)
            for i, g in enumerate(groups)
        }
        batcher = StepBatcher(compute, thread, sessions, wait_ms=50)
        steps = [step([5, 7], 2), step([9, 4], 2), step([3, 1], 2)]
        results = await asyncio.gather(
            *(batcher.step(s, t) for s, t in zip(sessions.values(), steps, strict=True))
        )
        return batcher, steps, results

    with torch.no_grad():
        batcher, steps, results = asyncio.run(main())
        thread.shutdown()
    assert batcher.stats() == {"batched_steps": 2, "batched_forwards": 1, "largest_batch": 2}
    for result, t in zip(results, steps, strict=True):
        torch.testing.assert_close(result, compute.step(span, span.new_cache(1, 16), t), atol=ATOL, rtol=0)
