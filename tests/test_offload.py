"""Offload policies on CPU: outputs stay bit-identical and the resident share is what was asked for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bloombee_family_llama import LlamaFamily
from bloombee_offload import NoOffload, PercentOffload
from family_helpers import save_tiny
from pydantic import ValidationError
from torch import nn
from transformers import LlamaConfig

from bloombee_core.model import BlockSpan, load_config
from bloombee_core.offload import offload_plan, param_bytes

CPU = torch.device("cpu")
LAYERS = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return save_tiny(config, tmp_path_factory.mktemp("offload") / "tiny-llama")


def load_span(path: Path) -> BlockSpan:
    return LlamaFamily().load_span(path, load_config(path), 0, LAYERS, torch.float32)


@torch.no_grad()
def run(span: BlockSpan) -> list[torch.Tensor]:
    """Prefill of 5 tokens, then 3 cached single-token steps: every hidden state the span returns."""
    torch.manual_seed(1)
    hidden = torch.randn(2, 5, 32)
    cache = span.new_cache(batch_size=2, max_length=8)
    positions = torch.arange(5).expand(2, 5)
    outputs = [span(hidden, position_ids=positions, attention_mask=torch.ones(2, 5), cache=cache)]
    for step in range(5, 8):
        token = torch.randn(2, 1, 32)
        mask = torch.ones(2, step + 1)
        outputs.append(span(token, position_ids=torch.full((2, 1), step), attention_mask=mask, cache=cache))
    return outputs


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> list[torch.Tensor]:
    return run(load_span(checkpoint))


@pytest.mark.parametrize("percent", [0, 37, 50, 100])
def test_percent_on_cpu_keeps_outputs_bit_identical(
    checkpoint: Path, reference: list[torch.Tensor], percent: int
) -> None:
    span = load_span(checkpoint)
    pointers = [p.data_ptr() for p in span.parameters()]
    policy = PercentOffload(PercentOffload.Options(weights_on_device=percent))
    assert policy.apply(span, CPU) is span
    for got, want in zip(run(span), reference, strict=True):
        assert torch.equal(got, want)
    # On CPU streaming must be a true no-op: the weights never move or get copied.
    assert [p.data_ptr() for p in span.parameters()] == pointers


def test_none_policy_keeps_everything_resident(checkpoint: Path, reference: list[torch.Tensor]) -> None:
    span = NoOffload().apply(load_span(checkpoint), CPU)
    plan = offload_plan(span)
    assert plan is not None and plan.streamed_bytes == 0 and plan.resident_fraction == 1.0
    assert plan.resident_bytes == sum(param_bytes(p) for p in span.parameters())
    assert all(torch.equal(a, b) for a, b in zip(run(span), reference, strict=True))


def test_percent_accounting_follows_the_option(checkpoint: Path) -> None:
    layer_bytes = [sum(param_bytes(p) for p in layer.parameters()) for layer in load_span(checkpoint).layers]
    assert len(set(layer_bytes)) == 1  # identical layers: 50% is exactly the first two
    total = sum(layer_bytes)
    largest = max(param_bytes(p) for p in load_span(checkpoint).parameters())
    meta = torch.device("meta")  # stands in for a GPU: the CPU tier is a tier of its own there
    for percent in (0, 10, 37, 50, 85, 100):
        span = PercentOffload(PercentOffload.Options(weights_on_device=percent)).apply(
            load_span(checkpoint), meta
        )
        plan = offload_plan(span)
        assert plan is not None and plan.total_bytes == total and plan.disk_bytes == 0
        # Never over budget, and short of it by less than one weight tensor.
        assert total * percent // 100 - largest < plan.resident_bytes <= total * percent // 100
    half = offload_plan(
        PercentOffload(PercentOffload.Options(weights_on_device=50)).apply(load_span(checkpoint), meta)
    )
    assert half is not None and half.resident_bytes == total // 2 and half.streamed_units == 2
    nothing = offload_plan(
        PercentOffload(PercentOffload.Options(weights_on_device=0)).apply(load_span(checkpoint), meta)
    )
    assert nothing is not None and nothing.resident_fraction == 0.0 and nothing.streamed_units == LAYERS


def test_on_a_cpu_device_cpu_memory_is_resident_and_disk_is_the_other_tier(checkpoint: Path) -> None:
    total = sum(param_bytes(p) for p in load_span(checkpoint).parameters())
    on_cpu = offload_plan(
        PercentOffload(PercentOffload.Options(weights_on_device=0)).apply(load_span(checkpoint), CPU)
    )
    assert on_cpu is not None and on_cpu.resident_bytes == total and on_cpu.streamed_units == 0
    quarter = offload_plan(
        PercentOffload(PercentOffload.Options(weights_on_device=50, weights_on_disk=25)).apply(
            load_span(checkpoint), CPU
        )
    )
    assert quarter is not None and quarter.disk_bytes == total // 4 and quarter.streamed_units == 1
    assert quarter.resident_bytes == total - total // 4 and quarter.cpu_bytes == 0


@pytest.mark.parametrize("on_disk", [50, 100])
def test_weights_on_disk_keep_outputs_bit_identical(
    checkpoint: Path, reference: list[torch.Tensor], on_disk: int
) -> None:
    span = PercentOffload(
        PercentOffload.Options(weights_on_device=100 - on_disk, weights_on_disk=on_disk)
    ).apply(load_span(checkpoint), CPU)
    plan = offload_plan(span)
    assert plan is not None and plan.streamed_units == LAYERS * on_disk // 100
    for _ in range(2):  # pages dropped after the first forward come back for the second
        for got, want in zip(run(span), reference, strict=True):
            assert torch.equal(got, want)
    # The streamed layers' weights are views of a private file mapping (the file itself is unlinked).
    mapped = mapped_bytes()
    assert mapped >= plan.disk_bytes


def mapped_bytes() -> int:
    """Size of this process's mappings of deleted offload files (``unit-*.bin (deleted)``)."""
    total = 0
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and "/unit-" in parts[5] and parts[5].endswith("(deleted)"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            total += end - start
    return total


def test_disk_pages_leave_memory_after_their_units_forward(tmp_path: Path) -> None:
    torch.manual_seed(0)
    span = nn.Sequential(*[nn.Linear(512, 512) for _ in range(4)])  # 1 MiB of weights per unit
    x = torch.randn(2, 512)
    want = span(x)
    policy = PercentOffload(
        PercentOffload.Options(weights_on_device=0, weights_on_disk=100, directory=tmp_path)
    )
    resident_during: list[int] = []
    for unit in span:  # registered before the policy's hooks: runs before the unit's pages are dropped
        unit.register_forward_hook(lambda module, args, out: resident_during.append(resident_mapped_kib()))
    policy.apply(span, CPU)
    assert list(tmp_path.rglob("*.bin")) == []  # unlinked once mapped: nothing is left behind
    with torch.no_grad():
        assert torch.equal(span(x), want)
    assert all(kib >= 1024 for kib in resident_during)  # a unit's weights were paged in for its forward
    # and dropped after it: of the 4 MiB at most the first unit's pages stay, fetched for the next forward
    assert resident_mapped_kib() < 1536


def resident_mapped_kib() -> int:
    """Resident KiB of this process's offload-file mappings, from /proc/self/smaps."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1] in "0123456789abcdef" and "-" in line.split()[0]:
            inside = "/unit-" in line
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_span_without_layers_uses_its_children_as_units() -> None:
    torch.manual_seed(0)
    span = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 8))
    x = torch.randn(3, 8)
    want = span(x)
    PercentOffload(PercentOffload.Options(weights_on_device=40, weights_on_disk=60)).apply(span, CPU)
    plan = offload_plan(span)
    assert plan is not None and plan.resident_bytes <= 0.4 * plan.total_bytes and plan.streamed_units >= 1
    assert torch.equal(span(x), want)


def test_policy_cannot_be_applied_twice(checkpoint: Path) -> None:
    span = PercentOffload(PercentOffload.Options(weights_on_device=50)).apply(load_span(checkpoint), CPU)
    with pytest.raises(ValueError, match="already applied"):
        NoOffload().apply(span, CPU)


def test_percent_option_is_validated() -> None:
    bad_options = [
        {"weights_on_device": 101},
        {"weights_on_device": -1},
        {"weights_on_gpu": 50},
        {"weights_on_device": 60, "weights_on_disk": 50},
        {"kv_on_device": 90, "kv_on_disk": 20},
    ]
    for bad in bad_options:
        with pytest.raises(ValidationError):
            PercentOffload.Options(**bad)
    assert PercentOffload().options.weights_on_device == 100


def test_streamed_weights_visit_the_device_only_during_their_units_forward() -> None:
    # The meta device stands in for a GPU: a real second device, on which forward runs shape-only.
    meta = torch.device("meta")
    span = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    PercentOffload(PercentOffload.Options(weights_on_device=34)).apply(span, meta)
    resident = [all(p.device == meta for p in unit.parameters()) for unit in span]
    assert resident == [True, False, False]
    seen_during_forward: list[set[str]] = []
    for unit in span:  # registered after the policy's hook, so it sees the loaded weights
        unit.register_forward_pre_hook(
            lambda module, args: seen_during_forward.append({p.device.type for p in module.parameters()})
        )
    out = span(torch.randn(3, 8, device=meta))
    assert out.device == meta and out.shape == (3, 8)
    assert seen_during_forward == [{"meta"}, {"meta"}, {"meta"}]
    assert [p.device.type for p in span[2].parameters()] == ["cpu", "cpu"]  # released again


def test_streaming_works_under_inference_mode() -> None:
    meta = torch.device("meta")
    span = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    PercentOffload(PercentOffload.Options(weights_on_device=0)).apply(span, meta)
    with torch.inference_mode():
        assert span(torch.randn(2, 8, device=meta)).shape == (2, 8)
    assert all(p.device.type == "cpu" and p.requires_grad for p in span.parameters())


def test_a_failing_forward_still_releases_the_streamed_weights() -> None:
    meta = torch.device("meta")
    span = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    PercentOffload(PercentOffload.Options(weights_on_device=0)).apply(span, meta)
    with pytest.raises(RuntimeError):
        span(torch.randn(2, 5, device=meta))  # wrong width: the first unit's forward raises
    assert all(p.device.type == "cpu" for p in span.parameters())
    assert span(torch.randn(2, 8, device=meta)).shape == (2, 8)  # and the span still works


def test_overlapping_forwards_of_a_unit_share_one_device_copy() -> None:
    meta = torch.device("meta")
    inner = nn.Linear(8, 8)
    span = nn.Sequential(nn.Sequential(inner))
    PercentOffload(PercentOffload.Options(weights_on_device=0)).apply(span, meta)
    seen: list[str] = []

    def reenter(module: nn.Module, args: tuple[torch.Tensor]) -> None:
        # A second forward of the same unit starts (and ends) while the first one is running.
        if len(seen) == 0:
            seen.append(inner.weight.device.type)
            span(args[0])
            seen.append(inner.weight.device.type)

    inner.register_forward_pre_hook(reenter)
    span(torch.randn(2, 8, device=meta))
    assert seen == ["meta", "meta"]  # the nested forward's end did not pull the weights from under us
    assert inner.weight.device.type == "cpu"
