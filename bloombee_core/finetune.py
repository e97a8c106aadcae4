"""The client's finetune job (``[job] kind = "finetune"``, settings in ``[finetune]``): train a tuning
method on a plain-text file through the swarm, save what it trained, and show the difference it makes.

The text is tokenized with the model's own tokenizer and cut into sequences of ``seq_len`` tokens; each
step trains on ``batch_size`` of them (in a seeded order, epoch after epoch) with AdamW. The servers'
blocks stay frozen: only the method's parameters (``model.trainable_parameters()``) change. Progress goes
to stderr; the summary — first and last losses, tokens/s, where the adapter went, the replies to
``job.prompt`` before and after training — to stdout.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import torch

from bloombee_core.errors import ConfigError
from bloombee_core.settings import ClientJob, JobSettings, check_plugin_choices

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from bloombee_core.client.model import DistributedModelForCausalLM
    from bloombee_core.registry import PluginSet
    from bloombee_core.settings import FinetuneSettings


@dataclass
class FinetuneResult:
    losses: list[float]  # one per step
    tokens_per_s: float  # text tokens trained on per second of training
    output: Path  # the saved adapter folder
    untuned: str  # the reply to job.prompt before training
    tuned: str  # ... and after
    window: int = field(init=False)  # steps averaged for the first / last loss

    def __post_init__(self) -> None:
        self.window = max(1, len(self.losses) // 5)

    @property
    def first_loss(self) -> float:
        return sum(self.losses[: self.window]) / self.window

    @property
    def last_loss(self) -> float:
        return sum(self.losses[-self.window :]) / self.window


def check_data(settings: FinetuneSettings) -> Path:
    """``finetune.data``, checked before anything slow starts.

    :raises ConfigError: keyed ``finetune.data`` when it is not set or not a file.
    """
    if settings.data is None:
        raise ConfigError("finetune.data", "the finetune job needs a text file to train on")
    if not Path(settings.data).is_file():
        raise ConfigError(
            "finetune.data", f"{str(settings.data)!r} is not a file (relative paths start at {Path.cwd()})"
        )
    return Path(settings.data)


def text_sequences(tokenizer: PreTrainedTokenizerBase, path: Path, seq_len: int) -> torch.Tensor:
    """The file's tokens cut into ``[n, seq_len]`` (the tail shorter than ``seq_len`` is left out).

    :raises ConfigError: keyed ``finetune.data`` when the file is shorter than one sequence.
    """
    ids = tokenizer(path.read_text(encoding="utf-8"))["input_ids"]
    count = len(ids) // seq_len
    if count == 0:
        raise ConfigError(
            "finetune.data", f"{path} holds {len(ids)} tokens, fewer than one sequence of seq_len={seq_len}"
        )
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


def batches(sequences: torch.Tensor, batch_size: int, seed: int):  # noqa: ANN201 (an endless iterator)
    """Endless batches of ``batch_size`` rows: every sequence once per epoch, in a seeded order."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            order += torch.randperm(len(sequences), generator=generator).tolist()
        rows, order = order[:batch_size], order[batch_size:]
        yield sequences[rows]


def reply(model: DistributedModelForCausalLM, tokenizer: PreTrainedTokenizerBase, job: JobSettings) -> str:
    """The greedy reply to ``job.prompt`` through the swarm (with the attached tuning method, if any)."""
    from bloombee_core.client.generate import prompt_inputs

    inputs = prompt_inputs(tokenizer, job.prompt, job.chat)
    with torch.no_grad():
        ids = model.generate(
            inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            max_new_tokens=job.max_new_tokens,
            do_sample=False,
        )
    return tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def train(
    model: DistributedModelForCausalLM, settings: FinetuneSettings, sequences: torch.Tensor
) -> tuple[list[float], float]:
    """``settings.steps`` AdamW steps on the attached tuning method; returns each step's loss and the
    tokens trained on per second. Progress (step, loss, tokens/s) is shown on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=settings.lr)
    stream = batches(sequences, settings.batch_size, settings.seed)
    console = Console(stderr=True)
    every = max(1, settings.steps // 10)  # lines that stay (and show in logs without a terminal)
    losses: list[float] = []
    tokens, busy = 0, 0.0
    columns = (
        TextColumn("fine-tuning"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}  {task.fields[speed]:.0f} tokens/s"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=settings.steps, loss=math.nan, speed=0.0)
        for step in range(1, settings.steps + 1):
            batch = next(stream)
            started = time.perf_counter()
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            busy += time.perf_counter() - started
            tokens += batch.numel()
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"the loss of step {step} is {losses[-1]}: lower finetune.lr")
            speed = tokens / busy
            progress.update(task, completed=step, loss=losses[-1], speed=speed)
            if step % every == 0 or step == settings.steps:
                progress.console.print(
                    f"step {step}/{settings.steps}  loss {losses[-1]:.4f}  {speed:.0f} tokens/s"
                )
    return losses, tokens / busy


def run_finetune(
    job: ClientJob, plugins: PluginSet, threads: int | None = None, out: TextIO | None = None
) -> FinetuneResult:
    """Train ``job.finetune.tuning`` through the swarm, save it to ``job.finetune.output``, and print
    the summary to ``out`` (stdout)."""
    from transformers import AutoTokenizer

    from bloombee_core.client import AutoDistributedModelForCausalLM
    from bloombee_core.model_files import resolve_model

    out = out or sys.stdout
    settings = job.finetune
    if not job.network.initial_peers:
        raise ConfigError("network.initial_peers", "the finetune job needs a swarm: give its multiaddrs")
    data = check_data(settings)
    check_plugin_choices(job, plugins)
    if threads:
        torch.set_num_threads(threads)
    folder = resolve_model(job.model.path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    sequences = text_sequences(tokenizer, data, settings.seq_len)
    method = plugins.create("tuning_methods", settings.tuning, "finetune.tuning")
    model = AutoDistributedModelForCausalLM.from_pretrained(
        folder,
        job.network.initial_peers,
        dtype=job.model.dtype,
        plugins=plugins,
        compressor=plugins.create("compressors", job.client.compressor, "client.compressor"),
        transport=plugins.create("transports", job.network.transport, "network.transport"),
        family=job.model.family,
    )
    try:
        untuned = reply(model, tokenizer, job.job)  # before the method is attached: the plain model
        torch.manual_seed(settings.seed)
        model.tune(method)
        count = sum(p.numel() for p in model.trainable_parameters())
        print(
            f"training {method.name} ({count:,} parameters) on {len(sequences)} sequences of "
            f"{settings.seq_len} tokens from {settings.data}",
            file=sys.stderr,
            flush=True,
        )
        losses, speed = train(model, settings, sequences)
        output = model.tuning_method.save(Path(settings.output))
        tuned = reply(model, tokenizer, job.job)
    finally:
        model.close()
    result = FinetuneResult(losses, speed, output, untuned, tuned)
    print_summary(result, job, out)
    return result


def print_summary(result: FinetuneResult, job: ClientJob, out: TextIO) -> None:
    steps = len(result.losses)
    out.write(
        f"loss: {result.first_loss:.4f} (mean of the first {result.window} steps) -> "
        f"{result.last_loss:.4f} (mean of the last {result.window} of {steps})\n"
        f"speed: {result.tokens_per_s:.0f} tokens/s (training, forward + backward through the swarm)\n"
        f"saved: {job.finetune.tuning.name} adapter in {result.output}\n"
        f"prompt: {job.job.prompt!r}\n"
        f"untuned: {result.untuned!r}\n"
        f"tuned:   {result.tuned!r}\n"
    )
    out.flush()
