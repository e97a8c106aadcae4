"""A KV cache kept partly in CPU memory or in memory-mapped files: outputs stay bit-identical to a cache
on the device, the files live exactly as long as the cache, and a disk-tier layer's pages leave the
process's resident memory once its attention is done."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from family_helpers import FAMILY_CONFIGS, TINY, save_tiny
from transformers import LlamaConfig, Qwen3Config

from bloombee_core import load_plugins
from bloombee_core.model import BlockSpan, load_config
from bloombee_core.model.batch import BatchItem, batched_forward
from bloombee_core.model.kv_tiers import TieredLayer, kv_placement

LAYERS = 4
HIDDEN = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    return save_tiny(config, tmp_path_factory.mktemp("kv-tiers") / "tiny-llama")


def load_span(path: Path, dtype: torch.dtype = torch.float32, start: int = 0, end: int | None = None):
    config = load_config(path)
    family = load_plugins().family_for(config)
    return family.load_span(path, config, start, end or config.num_hidden_layers, dtype)


def tiered(span: BlockSpan, folder: Path, on_device: int = 0, on_disk: int = 100, prefetch: bool = True):
    span.kv_placement = kv_placement(span, on_device, on_disk, folder, prefetch)
    return span


@torch.no_grad()
def run(span: BlockSpan, cache, batch: int = 2, steps: int = 3) -> list[torch.Tensor]:
    """Prefill of 5 tokens, then ``steps`` cached single-token steps: every hidden state returned."""
    generator = torch.Generator().manual_seed(1)
    dtype = next(span.parameters()).dtype
    size = span.config.hidden_size
    hidden = torch.randn(batch, 5, size, generator=generator).to(dtype)
    positions = torch.arange(5).expand(batch, 5)
    outputs = [span(hidden, position_ids=positions, attention_mask=torch.ones(batch, 5), cache=cache)]
    for step in range(5, 5 + steps):
        token = torch.randn(batch, 1, size, generator=generator).to(dtype)
        mask = torch.ones(batch, step + 1)
        outputs.append(
            span(token, position_ids=torch.full((batch, 1), step), attention_mask=mask, cache=cache)
        )
    return outputs


def assert_same_caches(got, want) -> None:
    assert got.length == want.length and got.nbytes() == want.nbytes()
    for a, b in zip(got._tensors(), want._tensors(), strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("on_device", "on_disk"), [(50, 50), (0, 100), (25, 50)])
def test_tiered_cache_gives_bit_identical_outputs(checkpoint, tmp_path, dtype, on_device, on_disk):
    span = load_span(checkpoint, dtype)
    plain = span.new_cache(2, 16)
    want = run(span, plain)
    cache = tiered(span, tmp_path, on_device, on_disk).new_cache(2, 16)
    disk = [i for i in range(LAYERS) if isinstance(cache.kv.layers[i], TieredLayer)]
    assert disk == list(range(LAYERS - LAYERS * on_disk // 100, LAYERS))  # the last layers go to disk
    got = run(span, cache)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert_same_caches(cache, plain)
    for c in (cache, plain):  # transformers' crop assigns a shorter view of the keys
        c.kv.crop(-2)
        c.length -= 2
    assert_same_caches(cache, plain)
    token = torch.randn(2, 1, HIDDEN).to(dtype)
    after = [span(token, position_ids=torch.full((2, 1), c.length), cache=c) for c in (cache, plain)]
    assert torch.equal(*after)
    cache.close()


@torch.no_grad()
def test_tree_step_keep_and_steps_match_the_untiered_tree_cache(checkpoint, tmp_path):
    span = load_span(checkpoint)
    outputs = {}
    for name in ("plain", "tiered"):
        if name == "tiered":
            tiered(span, tmp_path, 25, 50)
        cache = span.new_cache(2, 24, trees=True)
        generator = torch.Generator().manual_seed(3)
        prompt_mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        steps = [span(torch.randn(2, 6, HIDDEN, generator=generator), position_ids=positions,
                      attention_mask=prompt_mask, cache=cache)]  # fmt: skip
        tree = torch.tensor([[-1, 0, 0, 1, 1, 3, 5], [-1, 0, 1, 0, 3, 3, 2]])
        depth = torch.tensor([[0, 1, 1, 2, 2, 3, 4], [0, 1, 2, 1, 2, 2, 3]])
        mask = torch.cat([prompt_mask, torch.ones(2, 7, dtype=torch.long)], dim=1)
        hidden = torch.randn(2, 7, HIDDEN, generator=generator)
        lengths = prompt_mask.sum(-1, keepdim=True)
        steps.append(span(hidden, position_ids=lengths + depth, attention_mask=mask, cache=cache, tree=tree))
        cache.keep(torch.tensor([[0, 1, 3, 5], [0, 3, 4, 6]]), last=7)
        mask = torch.cat([prompt_mask, torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])], dim=1)
        for step in range(3):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            position = lengths + torch.tensor([[4], [3]]) + step
            token = torch.randn(2, 1, HIDDEN, generator=generator)
            steps.append(span(token, position_ids=position, attention_mask=mask, cache=cache))
        outputs[name] = steps, cache
    (got, tiered_cache), (want, plain_cache) = outputs["tiered"], outputs["plain"]
    assert any(isinstance(layer, TieredLayer) for layer in tiered_cache.kv.layers)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert_same_caches(tiered_cache, plain_cache)


@torch.no_grad()
def test_batched_forward_with_a_tiered_and_a_plain_session(checkpoint, tmp_path):
    span = load_span(checkpoint)
    sessions = [("tiered", 2), ("plain", 1)]  # name, batch size

    def new_caches(with_tiers: bool):
        caches = []
        for name, batch in sessions:
            span.kv_placement = None
            if name == "tiered" and with_tiers:
                tiered(span, tmp_path, 0, 50)
            caches.append(span.new_cache(batch, 16))
        return caches

    def prefill(caches):
        for cache, (_, batch) in zip(caches, sessions, strict=True):
            hidden = torch.randn(batch, 4, HIDDEN, generator=torch.Generator().manual_seed(batch))
            span(hidden, position_ids=torch.arange(4).expand(batch, 4), cache=cache)

    alone, batched, reference = new_caches(True), new_caches(True), new_caches(False)
    assert isinstance(batched[0].kv.layers[LAYERS - 1], TieredLayer)
    assert not isinstance(batched[1].kv.layers[LAYERS - 1], TieredLayer)
    for caches in (alone, batched, reference):
        prefill(caches)
    for step in range(4, 8):
        generator = torch.Generator().manual_seed(step)
        hidden = [torch.randn(batch, 1, HIDDEN, generator=generator) for _, batch in sessions]
        positions = [torch.full((batch, 1), step) for _, batch in sessions]
        got = batched_forward(
            span, [BatchItem(c, h, p) for c, h, p in zip(batched, hidden, positions, strict=True)]
        )
        want = batched_forward(
            span, [BatchItem(c, h, p) for c, h, p in zip(reference, hidden, positions, strict=True)]
        )
        one_by_one = [
            span(h, position_ids=p, cache=c) for c, h, p in zip(alone, hidden, positions, strict=True)
        ]
        for a, b, c in zip(got, want, one_by_one, strict=True):
            assert torch.equal(a, b)  # tiering changes nothing in a batched forward
            torch.testing.assert_close(a, c, atol=1e-5, rtol=0)  # a batch row is computed differently
    for got_cache, want_cache in zip(batched, reference, strict=True):
        assert_same_caches(got_cache, want_cache)


SLIDING_CONFIGS = {
    "gemma2": FAMILY_CONFIGS["gemma2"],  # sliding and full layers alternate, window 4
    "qwen3-sliding": lambda: Qwen3Config(
        **TINY, head_dim=16, use_sliding_window=True, sliding_window=4, max_window_layers=2
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", sorted(SLIDING_CONFIGS))
def test_sliding_layers_stay_on_the_device_and_outputs_match(name, tmp_path):
    folder = save_tiny(SLIDING_CONFIGS[name](), tmp_path / name)
    span = load_span(folder)
    want_cache = span.new_cache(2, 16)
    want = run(span, want_cache, steps=5)  # 10 tokens: past the 4-token window
    cache = tiered(span, tmp_path / "kv", 0, 100).new_cache(2, 16)
    for index in range(span.start, span.end):
        sliding = span.family.layer_type(span.config, index) == "sliding_attention"
        assert isinstance(cache.kv.layers[index], TieredLayer) == (not sliding), index
    assert any(not isinstance(layer, TieredLayer) for layer in cache.kv.layers)
    got = run(span, cache, steps=5)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert_same_caches(cache, want_cache)


def test_files_live_as_long_as_the_cache(checkpoint, tmp_path):
    span = tiered(load_span(checkpoint), tmp_path / "kv", 25, 50)
    cache = span.new_cache(2, 16)
    files = sorted((tmp_path / "kv").iterdir())
    assert len(files) == 2 and all(f.name.startswith("kv-layer") for f in files)
    run(span, cache)
    cache.close()
    assert list((tmp_path / "kv").iterdir()) == []
    assert cache.nbytes() == 0
    cache.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        run(span, cache)
    forgotten = span.new_cache(1, 8)
    assert len(list((tmp_path / "kv").iterdir())) == 2
    del forgotten  # a cache nobody closed removes its files when it is collected
    assert list((tmp_path / "kv").iterdir()) == []


@pytest.mark.parametrize("trees", [False, True])
def test_bytes_by_tier_add_up_to_cache_bytes(checkpoint, tmp_path, trees):
    span = load_span(checkpoint)
    assert span.cache_bytes_by_tier(3, 100, trees) == {
        "device": span.cache_bytes(3, 100, trees),
        "cpu": 0,
        "disk": 0,
    }
    tiered(span, tmp_path, 25, 50)
    by_tier = span.cache_bytes_by_tier(3, 100, trees)
    layer = 2 * 3 * 2 * 8 * 100 * 4  # keys+values * batch * kv heads * head dim * tokens * fp32
    assert by_tier == {"device": layer, "cpu": layer, "disk": 2 * layer}
    assert sum(by_tier.values()) == span.cache_bytes(3, 100, trees)
    assert span.sub_span(2, 4).cache_bytes_by_tier(3, 100, trees) == {
        "device": 0,
        "cpu": 0,
        "disk": 2 * layer,
    }


def test_bad_percents_and_overflow_are_refused(checkpoint, tmp_path):
    span = load_span(checkpoint)
    with pytest.raises(ValueError, match="on_disk"):
        kv_placement(span, 0, 101, tmp_path)
    with pytest.raises(ValueError, match="on_device"):
        kv_placement(span, -1, 0, tmp_path)
    with pytest.raises(ValueError, match="on_device \\+ on_disk"):
        kv_placement(span, 60, 50, tmp_path)
    cache = tiered(span, tmp_path).new_cache(1, 6)
    run(span, cache, batch=1, steps=1)
    new = torch.zeros(1, 2, 1, 8)
    with pytest.raises(ValueError, match="made for 6 tokens; it holds 6 and got 1 more.*max_length"):
        cache.kv.update(new, new, 0)
    with pytest.raises(ValueError, match="max_length"):
        run(span, span.new_cache(1, 6), batch=1, steps=2)


def test_a_directory_that_cannot_hold_files_is_named(checkpoint, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    span = tiered(load_span(checkpoint), blocker / "kv")
    with pytest.raises(OSError, match=re.escape(str(blocker / "kv"))):
        span.new_cache(1, 8)


def mapped_rss(path: Path) -> int:
    """Resident bytes of this process's mappings of ``path`` (from /proc/self/smaps)."""
    target, current, total = os.path.realpath(path), None, 0
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                parts = line.split(maxsplit=5)
                current = parts[5].strip() if len(parts) > 5 else None
            elif line.startswith("Rss:") and current == target:
                total += int(line.split()[1]) * 1024
    return total


FEW_PAGES = 4 * 4096


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc/self/smaps")
@pytest.mark.parametrize("prefetch", [False, True])
@torch.no_grad()
def test_disk_pages_leave_memory_layer_by_layer(checkpoint, tmp_path, prefetch):
    # 2 disk layers x keys+values x [64, 2 heads, 4096 tokens, 8] fp32 = 64 MiB of files
    span = tiered(load_span(checkpoint), tmp_path, 50, 50, prefetch)
    batch, tokens = 64, 64
    cache = span.new_cache(batch, 4096)
    files = {i: next(tmp_path.glob(f"kv-layer{i}-*.bin")) for i in (2, 3)}
    assert sum(f.stat().st_size for f in files.values()) >= 64 << 20
    seen = {}

    def record(name):
        def hook(*_) -> None:
            seen[name] = {i: mapped_rss(f) for i, f in files.items()}

        return hook

    hooks = [span.layers[3].register_forward_pre_hook(record("before 3")),
             span.layers[3].register_forward_hook(record("after 3"))]  # fmt: skip
    hidden = torch.randn(batch, tokens, HIDDEN)
    span(hidden, position_ids=torch.arange(tokens).expand(batch, -1), cache=cache)
    for hook in hooks:
        hook.remove()
    written = batch * 2 * 2 * tokens * 8 * 4  # one layer's new keys and values
    # layer 2's pages are resident while its attention may run, and given back once layer 3 takes over
    assert seen["before 3"][2] >= written
    assert seen["after 3"][2] <= FEW_PAGES and seen["after 3"][3] >= written
    assert all(rss <= FEW_PAGES for rss in (mapped_rss(f) for f in files.values()))  # settled
    for step in range(tokens, tokens + 3):  # decode steps page the past in and give it back again
        span(torch.randn(batch, 1, HIDDEN), position_ids=torch.full((batch, 1), step), cache=cache)
        assert all(mapped_rss(f) <= FEW_PAGES for f in files.values())
    cache.kv.update(torch.zeros(batch, 2, 1, 8), torch.zeros(batch, 2, 1, 8), 3)  # in use, unsettled
    assert mapped_rss(files[3]) > 0
    cache.settle()
    assert mapped_rss(files[3]) <= FEW_PAGES
    cache.close()
    assert not any(f.exists() for f in files.values())
