"""One generation through the swarm with tokens streamed to the terminal (``bloombee generate``, jobs)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from bloombee_core.compression import Compressor
    from bloombee_core.decoding import DecodingStrategy
    from bloombee_core.registry import PluginSet
    from bloombee_core.transport import Transport


def generate_text(
    model_path: str,
    initial_peers: list[str],
    prompt: str,
    *,
    max_new_tokens: int = 32,
    dtype: str = "float32",
    chat: bool = True,
    decoding: DecodingStrategy | None = None,
    plugins: PluginSet | None = None,
    compressor: Compressor | None = None,
    transport: Transport | None = None,
    family: str | None = None,
    out: TextIO | None = None,
    micro_batch: int | str = "auto",
    prefill_chunk: int | str = "auto",
) -> str:
    """Generate from ``prompt`` (as a chat turn, if the tokenizer has a chat template), print the tokens
    to ``out`` as they arrive, and return the new text. ``transport`` (not started yet) is how the client
    joins the swarm; by default the ``hivemind`` one."""
    from transformers import AutoTokenizer

    from bloombee_core.client import AutoDistributedModelForCausalLM
    from bloombee_core.model_files import resolve_model

    out = out or sys.stdout
    folder = resolve_model(model_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        folder,
        initial_peers,
        dtype=dtype,
        plugins=plugins,
        compressor=compressor,
        transport=transport,
        family=family,
        micro_batch=micro_batch,
        prefill_chunk=prefill_chunk,
    )
    try:
        inputs = prompt_inputs(tokenizer, prompt, chat)
        streamer = _Streamer(tokenizer, out)
        kwargs = dict(
            max_new_tokens=max_new_tokens, streamer=streamer, attention_mask=inputs["attention_mask"]
        )
        if decoding is not None:
            with torch.no_grad():
                ids = decoding.generate(model, inputs["input_ids"], **kwargs)
        else:
            with torch.no_grad():
                ids = model.generate(inputs["input_ids"], do_sample=False, **kwargs)
        out.write("\n")
        out.flush()
        stats = getattr(decoding, "last_stats", None)
        if stats:  # speculative decoding: how much each round trip yielded
            print(describe_speculation(stats), file=sys.stderr, flush=True)
        return tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        model.close()


def prompt_inputs(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of ``prompt``, as a chat turn if ``chat`` and the tokenizer
    has a chat template."""
    if chat and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return dict(tokenizer(prompt, return_tensors="pt"))


def describe_speculation(stats: dict) -> str:
    """One line: rounds, tokens per round (and what the acceptance predicts), acceptance by depth."""
    depths = " ".join(f"{a:.2f}" for a in stats.get("acceptance_by_depth", [])) or "-"
    line = f"speculative decoding: {stats['tokens']} tokens in {stats['rounds']} rounds, {stats['tokens_per_round']:.2f} per round"
    if stats.get("predicted_tokens_per_round"):
        line += f" (predicted {stats['predicted_tokens_per_round']:.2f})"
    return f"{line}; acceptance by depth: {depths}; rounds without drafts: {stats.get('plain_rounds', 0)}"


class _Streamer:
    """Prints tokens as they arrive (the prompt is skipped)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, out: TextIO) -> None:
        from transformers import TextStreamer

        self.inner = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.inner.on_finalized_text = self._write
        self.out = out

    def _write(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text)
        self.out.flush()

    def put(self, value: torch.Tensor) -> None:
        self.inner.put(value)

    def end(self) -> None:
        self.inner.end()
