"""Compression ratio and speed of every installed compressor on real hidden states; exponent entropy.

    python -m bench.compression [--model tiny|smollm2] [--prompt random|text|both] [--tokens 128 2048]
                                [--repeats 5] [--best] [--dtypes bfloat16 ...] [--links 10 100 1000]

The hidden states are what servers send each other: the outputs of every decoder block of a
benchmark model (bench/models.py) on a random prompt or real text (smollm2 only: this repository's
README and docs/architecture, pipeline and speculative pages, tokenized), for prefill messages (each ``--tokens`` size) and a
single-token decode message (the last token). One message per block output.

First it prints the Shannon entropy of the exponent field per block for bf16, fp16 and fp32 and the
lossless limit it implies (exponent entropy + every other bit taken as incompressible, as a fraction of
the raw size), and the entropy of the other bytes after the exponent is rotated into one byte (to check
they are incompressible). Then, per message kind, dtype and compressor: the wire ratio (mean over
blocks, and the worst block), encode and decode speed in MB/s of raw data (medians of ``--repeats``
passes, one thread; ``--best``: the fastest pass), and the link speed below which compressing pays:
``1/encode + 1/decode < (1 - ratio) / bandwidth``. ``auto@N`` is the ``auto`` compressor with a link
estimate of N Mbit/s.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench.models import MODEL_KEYS, load_bench_model, random_prompt
from bloombee_core.compression import Compressor
from bloombee_core.registry import load_plugins

REPO = Path(__file__).resolve().parent.parent
# Text the benchmark measures on; bench/compress_tables.py builds the packaged tables from other files.
EVAL_TEXT = ("README.md", "docs/architecture.md", "docs/pipeline.md", "docs/speculative.md")


def text_prompt(model_path: Path, tokens: int, files: tuple[str, ...] = EVAL_TEXT) -> torch.Tensor:
    """[1, tokens] ids of real text (this repository's docs) from the model's own tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    text = "\n\n".join((REPO / name).read_text() for name in files)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise ValueError(f"{', '.join(files)} hold only {ids.shape[1]} tokens, {tokens} asked for")
    return ids


@torch.inference_mode()
def hidden_states(
    model_key: str, tokens: int, prompt: str = "random", files: tuple[str, ...] = EVAL_TEXT
) -> torch.Tensor:
    """[blocks, tokens, hidden] fp32: the output of every decoder block for one prompt.

    ``prompt`` is ``"random"`` (random token ids) or ``"text"`` (``files`` tokenized; needs a model with
    a tokenizer, i.e. smollm2).
    """
    from transformers import AutoModelForCausalLM

    bench_model = load_bench_model(model_key)
    model = AutoModelForCausalLM.from_pretrained(bench_model.path, dtype=torch.float32).eval()
    if prompt == "text":
        prompt = text_prompt(bench_model.path, tokens, files)
    else:
        prompt = random_prompt(bench_model.vocab_size, 1, tokens)
    outputs = model(prompt, output_hidden_states=True)
    return torch.cat(outputs.hidden_states[1:], dim=0)  # drop the embeddings: servers send block outputs


FLOAT_BITS = {torch.bfloat16: (8, 7), torch.float16: (5, 10), torch.float32: (8, 23)}  # exponent, mantissa


def entropy_bits(values: np.ndarray, symbols: int) -> float:
    counts = np.bincount(values.ravel(), minlength=symbols).astype(np.float64)
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * np.log2(probs)).sum())


def exponent_entropy(block: torch.Tensor, dtype: torch.dtype) -> tuple[float, float, list[float]]:
    """(exponent entropy in bits, implied limit as a fraction of raw, entropy of each other byte after
    rotating every element left by one bit so the exponent's top 8 bits fill the top byte)."""
    exponent_bits, mantissa_bits = FLOAT_BITS[dtype]
    bits = 1 + exponent_bits + mantissa_bits
    signed = block.to(dtype).contiguous().view(torch.int16 if bits == 16 else torch.int32).numpy()
    words = signed.view(np.uint16 if bits == 16 else np.uint32).reshape(-1).astype(np.uint64)
    exponent = ((words >> mantissa_bits) & ((1 << exponent_bits) - 1)).astype(np.int64)
    h_exponent = entropy_bits(exponent, 1 << exponent_bits)
    rotated = ((words << 1) | (words >> (bits - 1))) & ((1 << bits) - 1)
    other = [entropy_bits(((rotated >> (8 * k)) & 0xFF).astype(np.int64), 256) for k in range(bits // 8 - 1)]
    return h_exponent, (h_exponent + bits - exponent_bits) / bits, other


def print_entropy(states: torch.Tensor, label: str) -> None:
    print(f"\nexponent entropy per block ({label}, {states.shape[1]} tokens × {states.shape[2]}):")
    for dtype in FLOAT_BITS:
        rows = [exponent_entropy(block, dtype) for block in states]
        h = [row[0] for row in rows]
        limits = [row[1] for row in rows]
        other = np.array([row[2] for row in rows]).mean(axis=0)
        worst = int(np.argmax(limits))
        print(
            f"  {str(dtype)[6:]:>8}: exponent {np.mean(h):.3f} bits of {FLOAT_BITS[dtype][0]} (mean; "
            f"{min(h):.3f}-{max(h):.3f}); limit mean {np.mean(limits):.4f}, worst {limits[worst]:.4f} "
            f"(block {worst}); other bytes, low to high: {', '.join(f'{x:.3f}' for x in other)} bits of 8"
        )
        print("            per block limit: " + " ".join(f"{x:.3f}" for x in limits))


def measure(
    compressor: Compressor, messages: list[torch.Tensor], repeats: int, best: bool = False
) -> tuple[float, float, float, float]:
    """(ratio, worst message's ratio, encode MB/s, decode MB/s) over ``messages``; speeds are medians
    of ``repeats`` passes, or the fastest pass with ``best`` (the least disturbed on a shared host)."""
    raw = sum(m.numel() * m.element_size() for m in messages)
    payloads = [compressor.encode(m) for m in messages]
    for message, payload in zip(messages, payloads, strict=True):
        restored = compressor.decode(payload, message.dtype, tuple(message.shape))
        assert torch.equal(restored.view(torch.uint8), message.view(torch.uint8)), (
            f"{compressor.name} is not lossless"
        )
    encode, decode = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        for message in messages:
            compressor.encode(message)
        encode.append(time.perf_counter() - started)
        started = time.perf_counter()
        for message, payload in zip(messages, payloads, strict=True):
            compressor.decode(payload, message.dtype, tuple(message.shape))
        decode.append(time.perf_counter() - started)
    ratio = sum(len(p) for p in payloads) / raw
    worst = max(len(p) / (m.numel() * m.element_size()) for m, p in zip(messages, payloads, strict=True))
    pick = min if best else statistics.median
    return ratio, worst, raw / pick(encode) / 1e6, raw / pick(decode) / 1e6


def break_even_mbit(ratio: float, encode_mbs: float, decode_mbs: float) -> float:
    """Link speed (Mbit/s) below which the bytes saved outweigh the time spent (de)compressing."""
    if ratio >= 1:
        return 0.0
    seconds_per_byte = 1 / (encode_mbs * 1e6) + 1 / (decode_mbs * 1e6)
    return (1 - ratio) / seconds_per_byte * 8 / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODEL_KEYS, default="tiny")
    parser.add_argument("--prompt", choices=["random", "text", "both"], default="random")
    parser.add_argument("--tokens", type=int, nargs="+", default=[128], help="prefill lengths")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--compressors",
        nargs="+",
        default=["none", "lz4", "zstd", "zstd-bytesplit", "zstd-exponent"],
        help="installed names",
    )
    parser.add_argument("--best", action="store_true", help="fastest pass instead of the median")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"])
    parser.add_argument("--no-entropy", action="store_true", help="skip the entropy table")
    parser.add_argument("--links", type=float, nargs="*", default=[10, 100, 1000], help="auto's Mbit/s")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # speeds are per core

    plugins = load_plugins()
    compressors = [(name, plugins.create("compressors", name)) for name in args.compressors]
    for mbit in args.links:
        auto = plugins.create("compressors", "auto")
        auto.bandwidth_bytes_per_s = mbit * 1e6 / 8
        compressors.append((f"auto@{mbit:g}M", auto))
    prompts = ["random", "text"] if args.prompt == "both" else [args.prompt]
    header = (
        f"{'message':>18} {'dtype':>9} {'compressor':>15} {'ratio':>6} {'worst':>6} "
        f"{'enc MB/s':>9} {'dec MB/s':>9} {'pays below':>12}"
    )
    for prompt in prompts:
        states = hidden_states(args.model, max(args.tokens), prompt)
        blocks, _, hidden = states.shape
        print(
            f"\nmodel {args.model}, {prompt} prompt: {blocks} blocks, hidden {hidden}; one message per block"
        )
        if not args.no_entropy:
            print_entropy(states, f"{prompt} prompt")
        print()
        print(header)
        print("-" * len(header))
        kinds = [(f"prefill {n} tok", states[:, :n]) for n in args.tokens]
        for label, sliced in [*kinds, ("decode 1 tok", states[:, -1:])]:
            for dtype in [getattr(torch, name) for name in args.dtypes]:
                messages = [block[None].to(dtype).contiguous() for block in sliced]
                for name, compressor in compressors:
                    ratio, worst, enc, dec = measure(compressor, messages, args.repeats, args.best)
                    pays = break_even_mbit(ratio, enc, dec)
                    pays_text = f"{pays:8.0f} Mbit" if pays else "never"
                    print(
                        f"{label:>18} {str(dtype)[6:]:>9} {name:>15} {ratio:6.3f} {worst:6.3f} "
                        f"{enc:9.0f} {dec:9.0f} {pays_text:>12}",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
