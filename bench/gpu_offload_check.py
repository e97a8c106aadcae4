"""GPU check of the offload policies: outputs, resident/streamed bytes and peak CUDA memory.

Run from the repository root on a machine with a CUDA GPU (under two minutes; exits 1 on a mismatch):

    python bench/gpu_offload_check.py [--layers 8] [--hidden 1024] [--dtype float32]
    (or: python -m bench.gpu_offload_check ...)

It builds a tiny random LLaMA (transformers' ``LlamaModel``: its ``layers`` are the offload units),
runs prefill + cached decode with every weight on the GPU, then again after ``percent`` with
``weights_on_device`` 100, 50 and 0 (and 50, 0 without prefetching), and checks the outputs are bit-identical to the all-on-GPU run
(the same kernels run on the same data; only where the weights wait between forwards changes).

Needs torch (CUDA), transformers, pluggy and pydantic + pydantic-settings (imported by bloombee_core);
the repository does not have to be pip-installed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, Python puts bench/ first on the path, where bench/profile.py would shadow the
# standard library's profile module (which torch imports); import from the repository root instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]

import torch  # noqa: E402
from bloombee_offload import NoOffload, PercentOffload  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaModel  # noqa: E402

from bloombee_core.offload import offload_plan  # noqa: E402

MIB = 1 << 20


class CudaMemory:
    """Device memory used since creation: now, and at its peak."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        self.base = torch.cuda.memory_allocated(device)

    def used(self) -> int:
        return torch.cuda.memory_allocated(self.device) - self.base

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) - self.base


def build_model(args: argparse.Namespace) -> LlamaModel:
    config = LlamaConfig(
        vocab_size=256,  # small, so the embedding (always resident) barely counts
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 256),
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    return LlamaModel(config).to(getattr(torch, args.dtype)).eval()


def token_ids(model: LlamaModel, device: torch.device, steps: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (2, 64 + steps), generator=generator).to(device)


@torch.inference_mode()
def run(model: LlamaModel, device: torch.device, steps: int) -> list[torch.Tensor]:
    """Prefill 64 tokens, then ``steps`` cached single-token steps; every hidden state, on the CPU."""
    ids = token_ids(model, device, steps)
    cache = DynamicCache(config=model.config)
    # The cache goes positionally: transformers renamed that argument (past_key_values -> cache) in 5.x.
    outputs = [model(ids[:, :64], None, None, cache, use_cache=True).last_hidden_state]
    for step in range(64, 64 + steps):
        outputs.append(model(ids[:, step : step + 1], None, None, cache, use_cache=True).last_hidden_state)
    return [out.float().cpu() for out in outputs]


def grad_forward_matches(model: LlamaModel, device: torch.device, steps: int, want: torch.Tensor) -> bool:
    """A forward with autograd on, after inference-mode ones (prefetched copies must not leak into it)."""
    ids = token_ids(model, device, steps)
    got = model(ids[:, :64]).last_hidden_state
    got.float().sum().backward()  # through every block, whose copies autograd keeps alive until here
    grad = model.embed_tokens.weight.grad
    model.embed_tokens.weight.grad = None
    finite = grad is not None and bool(torch.isfinite(grad).all())
    return finite and torch.allclose(got.detach().float().cpu(), want, atol=1e-3, rtol=1e-3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8, help="cached decode steps after the prefill")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda", help="cpu only to dry-run this script itself")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU (the CPU path is covered by tests/test_offload.py)")
        return 2
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"torch {torch.__version__} on {name}; {args}")

    failures = 0
    reference: list[torch.Tensor] | None = None
    for label, policy in [
        ("none (all on GPU)", NoOffload()),
        ("percent 100", PercentOffload(PercentOffload.Options(weights_on_device=100))),
        ("percent 50", PercentOffload(PercentOffload.Options(weights_on_device=50))),
        ("percent 0", PercentOffload(PercentOffload.Options(weights_on_device=0))),
        ("percent 50 no-pf", PercentOffload(PercentOffload.Options(weights_on_device=50, prefetch=False))),
        ("percent 0 no-pf", PercentOffload(PercentOffload.Options(weights_on_device=0, prefetch=False))),
    ]:
        model = build_model(args)  # a fresh CPU model each time, as a server loads its span
        model.requires_grad_(False)  # frozen blocks, as streaming requires; the embeddings (resident)
        model.embed_tokens.weight.requires_grad_(True)  # train, so backward runs through the blocks
        memory = CudaMemory(device) if cuda else None
        policy.apply(model, device)
        after_apply = memory.used() if memory else 0
        run(model, device, 1)  # warm-up (kernels, allocator)
        started = time.perf_counter()
        outputs = run(model, device, args.steps)  # ends with a copy to the CPU: synchronised
        elapsed = time.perf_counter() - started
        peak = memory.peak() if memory else 0
        plan = offload_plan(model)
        assert plan is not None
        on_cpu = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cpu")
        pinned = not cuda or all(p.is_pinned() for p in model.parameters() if p.device.type == "cpu")
        if reference is None:
            reference = outputs
            verdict = "reference"
        else:
            worst = max((a - b).abs().max().item() for a, b in zip(outputs, reference, strict=True))
            same = all(torch.equal(a, b) for a, b in zip(outputs, reference, strict=True))
            verdict = "bit-identical" if same else f"MISMATCH (max abs diff {worst:.3g})"
            failures += not same
        if not grad_forward_matches(model, device, args.steps, outputs[0]):
            verdict += "; GRAD-MODE FORWARD DIFFERS"
            failures += 1
        if cuda and (on_cpu != plan.streamed_bytes or not pinned):
            verdict += f"; WRONG PLACEMENT ({on_cpu} bytes on CPU, pinned={pinned})"
            failures += 1
        print(
            f"{label:18} resident {plan.resident_bytes / MIB:8.1f} MiB ({plan.resident_fraction:6.1%})  "
            f"streamed {plan.streamed_bytes / MIB:8.1f} MiB in {plan.streamed_units} units  "
            f"GPU after apply {after_apply / MIB:8.1f} MiB  peak {peak / MIB:8.1f} MiB  "
            f"{elapsed * 1000:7.1f} ms  {verdict}"
        )
        del model, outputs
    print("OK" if not failures else f"FAILED: {failures} problem(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
