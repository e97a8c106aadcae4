"""Compression ratio and speed of every installed compressor on real hidden states, bf16 and fp32.

    python -m bench.compression [--model tiny|smollm2] [--tokens 128] [--repeats 5]

The hidden states are what servers send each other: the outputs of every decoder block of a
benchmark model (bench/models.py) on a random prompt, for a prefill message (``--tokens`` tokens)
and a single-token decode message. For each compressor and dtype it prints the wire ratio
(compressed / raw), encode and decode speed in MB/s of raw data (medians), and the link speed below
which compressing pays off: ``1/encode + 1/decode < (1 - ratio) / bandwidth``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench.models import MODEL_KEYS, load_bench_model, random_prompt
from bloombee_core.compression import Compressor
from bloombee_core.registry import load_plugins

REPO = Path(__file__).resolve().parent.parent
# Text the benchmark measures on; bench/compress_tables.py builds the packaged tables from other files.
EVAL_TEXT = ("README.md", "docs/architecture.md")


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


def measure(compressor: Compressor, messages: list[torch.Tensor], repeats: int) -> tuple[float, float, float]:
    """(ratio, encode MB/s, decode MB/s) over ``messages``; speeds are medians of ``repeats`` passes."""
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
    return ratio, raw / statistics.median(encode) / 1e6, raw / statistics.median(decode) / 1e6


def break_even_mbit(ratio: float, encode_mbs: float, decode_mbs: float) -> float:
    """Link speed (Mbit/s) below which the bytes saved outweigh the time spent (de)compressing."""
    if ratio >= 1:
        return 0.0
    seconds_per_byte = 1 / (encode_mbs * 1e6) + 1 / (decode_mbs * 1e6)
    return (1 - ratio) / seconds_per_byte * 8 / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODEL_KEYS, default="tiny")
    parser.add_argument("--tokens", type=int, default=128, help="prefill length")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--compressors", nargs="+", default=["none", "lz4", "zstd", "zstd-bytesplit"], help="installed names"
    )
    args = parser.parse_args(argv)

    states = hidden_states(args.model, args.tokens)
    blocks, _, hidden = states.shape
    plugins = load_plugins()
    compressors = [plugins.create("compressors", name) for name in args.compressors]
    print(f"model {args.model}: {blocks} blocks, hidden {hidden}; one message per block output")
    header = f"{'message':>18} {'dtype':>9} {'compressor':>15} {'ratio':>6} {'enc MB/s':>9} {'dec MB/s':>9} {'pays below':>12}"
    print(header)
    print("-" * len(header))
    for label, sliced in [(f"prefill {args.tokens} tok", states), ("decode 1 tok", states[:, -1:])]:
        for dtype in (torch.bfloat16, torch.float32):
            messages = [block[None].to(dtype).contiguous() for block in sliced]
            for compressor in compressors:
                ratio, enc, dec = measure(compressor, messages, args.repeats)
                pays = break_even_mbit(ratio, enc, dec)
                pays_text = f"{pays:8.0f} Mbit" if pays else "never"
                print(
                    f"{label:>18} {str(dtype)[6:]:>9} {compressor.name:>15} {ratio:6.3f} {enc:9.0f} {dec:9.0f} {pays_text:>12}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
