"""GPU check of offloading: every tier against all-on-GPU — outputs, placement, peak CUDA memory, speed.

Run from the repository root on a machine with a CUDA GPU (a few minutes; exits 1 on a problem):

    python bench/gpu_offload_check.py [--layers 8] [--hidden 2048] [--dtype bfloat16]

It saves a random LLaMA checkpoint, then loads its blocks as a server does (layer by layer through the
offload placer, ``family.load_span(..., place=...)``) once per configuration: everything on the GPU
(the reference), weights partly in pinned CPU memory or memory-mapped from disk (with and without
prefetch on the side stream), KV-cache layers in pinned CPU memory or on disk, both together, and a
memory budget (``server.memory_budget``'s own plan, at about half the reference's peak plus two
blocks of staging and a forward's working reserve). Each runs a prefill
and cached decode steps and must give bit-identical hidden states to the reference; CPU-tier weights
must be pinned, and the budgeted run's peak allocated device memory must stay within the budget. A
forward and backward with autograd on, after inference-mode ones, must equal the reference's too
(prefetched inference-mode copies must not leak into it).
Prints resident/CPU/disk bytes, peak CUDA memory, prefill ms and decode ms per step for each.
``--device cpu`` dry-runs the script itself.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, Python puts bench/ first on the path, where bench/profile.py would shadow the
# standard library's profile module (which torch imports); import from the repository root instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins"), str(ROOT / "model_families")]

import torch  # noqa: E402
from bloombee_family_llama import LlamaFamily  # noqa: E402
from bloombee_offload import NoOffload, PercentOffload  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from bloombee_core.model import load_config  # noqa: E402
from bloombee_core.model.checkpoint import span_weight_bytes  # noqa: E402
from bloombee_core.server.budget import plan_memory, working_bytes  # noqa: E402

MIB = 1 << 20
PROMPT = 64
CONFIGS = {
    "none (all on GPU)": None,
    "weights 50% cpu": {"weights_on_device": 50},
    "weights 0% cpu": {"weights_on_device": 0},
    "weights 50% cpu no-pf": {"weights_on_device": 50, "prefetch": False},
    "weights 0% cpu no-pf": {"weights_on_device": 0, "prefetch": False},
    "weights 50% disk": {"weights_on_device": 50, "weights_on_disk": 50},
    "weights 0% disk": {"weights_on_device": 0, "weights_on_disk": 100},
    "kv 50% cpu": {"kv_on_device": 50},
    "kv 50% disk": {"kv_on_disk": 50},
    "w 50% cpu + kv 50% disk": {"weights_on_device": 50, "kv_on_disk": 50},
    "budget": "budget",
}


def save_checkpoint(args: argparse.Namespace, folder: Path) -> Path:
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 256),
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(getattr(torch, args.dtype)).save_pretrained(folder)
    return folder


def load(path: Path, device: torch.device, dtype: torch.dtype, policy, limit: int | None = None):
    """The span as a server places it: layer by layer, the placer moving each as it loads."""
    family, config = LlamaFamily(), load_config(path)
    layers = family.num_blocks(config)
    placer = policy.placer(device, sum(span_weight_bytes(family, path, 0, layers, dtype)))
    if limit is not None:
        placer.limit_device(limit)
    span = family.load_span(path, config, 0, layers, dtype, "cpu", place=placer.add_unit)
    plan = placer.finish(span, policy.kv_shares())
    return span.requires_grad_(False), plan


def inputs(span, device: torch.device, dtype: torch.dtype, steps: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, PROMPT + steps, span.config.hidden_size, generator=generator).to(device, dtype)


@torch.inference_mode()
def run(
    span, device: torch.device, dtype: torch.dtype, steps: int
) -> tuple[list[torch.Tensor], float, float]:
    """Prefill, then ``steps`` cached one-token steps: every output (on the CPU), prefill ms, ms/step."""
    hidden = inputs(span, device, dtype, steps)
    cache = span.new_cache(2, PROMPT + steps)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    begin = time.perf_counter()
    outputs = [span(hidden[:, :PROMPT], position_ids=torch.arange(PROMPT, device=device)[None], cache=cache)]
    sync()
    prefill = time.perf_counter() - begin
    times = []
    for i in range(PROMPT, PROMPT + steps):
        begin = time.perf_counter()
        outputs.append(
            span(hidden[:, i : i + 1], position_ids=torch.full((1, 1), i, device=device), cache=cache)
        )
        sync()
        times.append(time.perf_counter() - begin)
    cache.close()
    return [o.float().cpu() for o in outputs], 1000 * prefill, 1000 * statistics.median(times)


def grad_forward(span, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """A forward with autograd on (inputs requiring grad), after inference-mode ones: its output and
    input gradient (on the CPU), or None where the gradient is missing or not finite."""
    hidden = inputs(span, device, dtype, 0)[:, :PROMPT].clone().requires_grad_(True)
    got = span(hidden, position_ids=torch.arange(PROMPT, device=device)[None])
    got.float().sum().backward()
    if hidden.grad is None or not bool(torch.isfinite(hidden.grad).all()):
        return None
    return torch.cat([got.detach().float().cpu().flatten(), hidden.grad.float().cpu().flatten()])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=16, help="cached decode steps after the prefill")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda", help="cpu only to dry-run this script itself")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU (the CPU path is covered by tests/test_offload.py)")
        return 2
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"torch {torch.__version__} on {name}; {args}")
    path = save_checkpoint(args, Path(tempfile.mkdtemp(prefix="bloombee-gpu-check-")))
    failures, reference, reference_peak, reference_grad = 0, None, 0, None
    warm, _ = load(path, device, dtype, NoOffload())
    run(warm, device, dtype, args.steps)  # the process's first kernels, cuBLAS handles: not the reference's
    del warm
    for label, options in CONFIGS.items():
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if cuda else 0
        budget = None
        if options == "budget":
            policy = NoOffload()
            family, config = LlamaFamily(), load_config(path)
            sizes = span_weight_bytes(family, path, 0, family.num_blocks(config), dtype)
            staging = 2 * max(sizes) + working_bytes(config, 256, dtype.itemsize)
            budget = base + max(reference_peak, sum(sizes)) // 2 + staging
            plan = plan_memory(
                budget, base, sum(sizes), max(sizes), config, dtype.itemsize, 16384, None, 64 * MIB
            )
            span, placed = load(path, device, dtype, policy, plan.weights)
            label += f" {budget / MIB:.0f} MiB"
        else:
            policy = NoOffload() if options is None else PercentOffload(PercentOffload.Options(**options))
            span, placed = load(path, device, dtype, policy)
        run(span, device, dtype, 2)  # warm-up: kernels, allocator, page cache
        outputs, prefill_ms, step_ms = run(span, device, dtype, args.steps)
        peak = (torch.cuda.max_memory_allocated(device) - base) if cuda else 0
        cpu_params = [p for p in span.parameters() if p.device.type == "cpu"]
        pinned = sum(p.numel() * p.element_size() for p in cpu_params if cuda and p.is_pinned())
        grad = grad_forward(span, device, dtype)
        if reference is None:
            reference, reference_peak, reference_grad, verdict = outputs, peak, grad, "reference"
        else:
            same = all(torch.equal(a, b) for a, b in zip(outputs, reference, strict=True))
            worst = max((a - b).abs().max().item() for a, b in zip(outputs, reference, strict=True))
            verdict = "bit-identical" if same else f"MISMATCH (max abs diff {worst:.3g})"
            failures += not same
        if grad is None or reference_grad is None or not torch.equal(grad, reference_grad):
            verdict += "; GRAD-MODE FORWARD DIFFERS"
            failures += 1
        if cuda and pinned != placed.cpu_bytes:
            verdict += f"; CPU TIER NOT PINNED ({pinned} of {placed.cpu_bytes} bytes)"
            failures += 1
        if budget is not None and base + peak > budget:
            verdict += f"; OVER BUDGET (peak {(base + peak) / MIB:.0f} MiB)"
            failures += 1
        print(
            f"{label:34} weights dev {placed.resident_bytes / MIB:7.1f} cpu {placed.cpu_bytes / MIB:7.1f} "
            f"disk {placed.disk_bytes / MIB:7.1f} MiB  kv {placed.kv}  peak {peak / MIB:8.1f} MiB  "
            f"prefill {prefill_ms:7.1f} ms  decode {step_ms:6.2f} ms/step  {verdict}",
            flush=True,
        )
        del span, outputs
    print("OK" if not failures else f"FAILED: {failures} problem(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
