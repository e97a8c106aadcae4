"""The benchmark models: a tiny random LLaMA (built once, cached) and the packaged SmolLM2-135M.

Prompts are random token ids with a fixed seed: speed does not depend on the words, and the tiny
model has no tokenizer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

TINY_SEED = 0


@dataclass(frozen=True)
class BenchModel:
    key: str  # short name used on the command line and in reports
    label: str  # what the report calls it
    path: Path  # local folder with config.json + safetensors
    num_blocks: int
    hidden_size: int
    vocab_size: int
    dtype: torch.dtype

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


MODEL_KEYS = ("tiny", "smollm2")


def _cache_root() -> Path:
    return (
        Path(os.environ.get("BLOOMBEE_CACHE_DIR") or Path.home() / ".cache" / "bloombee").expanduser()
        / "bench"
    )


def tiny_llama_config():
    from transformers import LlamaConfig

    # BENCHMARKS.md's anchor model: 8 layers, hidden 256, fp32. Positions reach 2048 prompt + decode tokens.
    return LlamaConfig(
        num_hidden_layers=8,
        hidden_size=256,
        intermediate_size=688,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def tiny_llama(folder: Path | None = None) -> Path:
    """Save the tiny random LLaMA once (fixed seed) and return its folder."""
    folder = folder or _cache_root() / f"tiny-llama-8x256-seed{TINY_SEED}"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    from transformers import AutoModelForCausalLM

    torch.manual_seed(TINY_SEED)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(), dtype=torch.float32)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tmp.rename(folder)  # atomic: a crashed save never looks like a finished one
    return folder


def load_bench_model(key: str) -> BenchModel:
    """Resolve ``tiny`` or ``smollm2`` to a local folder (building / converting it once)."""
    if key == "tiny":
        path, label = tiny_llama(), "tiny LLaMA (8×256)"
    elif key == "smollm2":
        from bloombee_core.model_files import resolve_model

        path, label = Path(resolve_model("smollm2")), "SmolLM2-135M"
    else:
        raise ValueError(f"unknown benchmark model {key!r}; choose one of {', '.join(MODEL_KEYS)}")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    return BenchModel(
        key=key,
        label=label,
        path=path,
        num_blocks=int(config.num_hidden_layers),
        hidden_size=int(config.hidden_size),
        vocab_size=int(config.vocab_size),
        dtype=torch.float32,
    )


def even_cuts(num_blocks: int, servers: int) -> list[int]:
    """Block boundaries splitting ``num_blocks`` as evenly as possible over ``servers`` (earlier spans larger)."""
    if not 1 <= servers <= num_blocks:
        raise ValueError(f"cannot split {num_blocks} blocks over {servers} servers")
    base, extra = divmod(num_blocks, servers)
    cuts = [0]
    for i in range(servers):
        cuts.append(cuts[-1] + base + (1 if i < extra else 0))
    return cuts


def split_label(cuts: list[int]) -> str:
    return " + ".join(f"{a}:{b}" for a, b in zip(cuts[:-1], cuts[1:], strict=True))


def random_prompt(vocab_size: int, batch: int, tokens: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Skip the lowest ids: special tokens (BOS/EOS/pad) would change nothing in speed but look odd.
    return torch.randint(min(16, vocab_size - 1), vocab_size, (batch, tokens), generator=generator)
