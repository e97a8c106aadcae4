"""``python -m bench finetune``: one fine-tuning step (forward + backward) through the swarm, beside its floor.

SmolLM2-135M in fp32 split over two servers behind the WAN proxy; a batch of ``--batch`` × ``--tokens``
(default 8 × 128) random tokens with the causal-LM loss; tuning methods ``lora`` (r = 8 on q/v) and
``deep-prompt`` (8 tokens); compression ``none`` (servers and client) against the default ``auto``; per
link setting (default ``0ms`` and ``20ms``: 20 ms one way, 100 Mbit/s). After a warm-up step, the median
of ``--runs`` steps (wall time of ``loss = model(...).loss; loss.backward()``).

The floor beside each: the same forward and backward computed locally in this process (transformers,
with the same LoRA through peft, or the same deep prompts through hooks) plus what the network must
carry — a stateless forward and backward are client-mediated, so 2 one-way latencies per hop each, and
per hop the hidden states out and back (forward) and the hidden states and gradient out and the
gradient back (backward), over the link's cap.
Results: bench/results/finetune.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.floors import LINKS, parse_link

RESULTS_JSON = Path(__file__).resolve().parent / "results" / "finetune.json"
METHODS = {
    "lora": {"name": "lora", "r": 8, "alpha": 16.0, "target_modules": ["q_proj", "v_proj"]},
    "deep-prompt": {"name": "deep-prompt", "num_virtual_tokens": 8},
}
COMPRESSORS = ("none", "auto")
SERVERS = 2


def batch_of(vocab: int, batch: int, tokens: int) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, tokens), generator=torch.Generator().manual_seed(0))


def step_s(model: Any, ids: torch.Tensor) -> float:
    begin = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    elapsed = time.perf_counter() - begin
    for p in model.trainable_parameters():
        p.grad = None
    return elapsed


def local_step_s(path: Path, method: str, ids: torch.Tensor, runs: int) -> float:
    """The same step on the whole model in this process: the compute part of the floor."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.requires_grad_(False)
    options = METHODS[method]
    if method == "lora":
        config = LoraConfig(
            r=options["r"], lora_alpha=options["alpha"], target_modules=options["target_modules"]
        )
        model = get_peft_model(model, config)
        run = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    else:
        prefix = options["num_virtual_tokens"]
        prompt = torch.zeros(prefix, model.config.hidden_size, requires_grad=True)
        deep = torch.zeros(len(model.model.layers), prefix, model.config.hidden_size, requires_grad=True)
        for i, layer in enumerate(model.model.layers):

            def add(module, args, kwargs, i=i):  # noqa: ANN001, ANN202
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                hidden = torch.cat([hidden[:, :prefix] + deep[i], hidden[:, prefix:]], dim=1)
                return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

            layer.register_forward_pre_hook(add, with_kwargs=True)

        def run() -> torch.Tensor:
            embeds = model.get_input_embeddings()(ids)
            embeds = torch.cat([prompt[None].expand(ids.shape[0], -1, -1), embeds], dim=1)
            logits = model(inputs_embeds=embeds).logits[:, prefix:]
            return torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
            )

    times = []
    for _ in range(runs + 1):
        begin = time.perf_counter()
        run().backward()
        times.append(time.perf_counter() - begin)
    return statistics.median(times[1:])


def network_floor_s(link_name: str, batch: int, tokens: int, hidden: int, ratio: float) -> float:
    """Latency and bytes a client-mediated forward + backward must spend on the links."""
    link = LINKS[link_name]
    latency = 4 * SERVERS * link.delay_ms / 1000  # forward and backward: out and back per hop
    if link.bytes_per_s is None:
        return latency
    state = batch * tokens * hidden * 4 * ratio
    return latency + SERVERS * (2 + 3) * state / link.bytes_per_s


def run_link(model: Any, cuts: list[int], link_name: str, args: argparse.Namespace) -> dict[str, Any]:
    from contextlib import ExitStack

    from bench.runner import swarm_client
    from bloombee_core.client import AutoDistributedModelForCausalLM
    from bloombee_core.compression import RAW

    ids = batch_of(model.vocab_size, args.batch, args.tokens)
    results: dict[str, Any] = {}
    with ExitStack() as stack:
        clients = {}
        for compressor in COMPRESSORS:
            options = {"compressor": RAW} if compressor == "none" else {}
            client, swarm = stack.enter_context(
                swarm_client(
                    model,
                    cuts,
                    parse_link(link_name),
                    args.threads,
                    240.0,
                    dtype=torch.float32,
                    server_args=["--compressor", compressor],
                    client_options=options,
                )
            )
            for method, choice in METHODS.items():
                tuned = AutoDistributedModelForCausalLM.from_pretrained(
                    model.path, initial_peers=swarm.initial_peers, dtype=torch.float32, **options
                )
                stack.callback(tuned.close)
                tuned.tune(choice)
                clients[(compressor, method)] = tuned
        for tuned in clients.values():  # warm-up: adapters uploaded, links measured
            step_s(tuned, ids)
        for key in clients:
            results[key] = {"values": [], "traffic": {}}
        for run in range(args.runs):
            order = list(clients.items())[:: 1 if run % 2 == 0 else -1]
            for key, tuned in order:
                before = dict(tuned.swarm.links.total.as_dict())
                results[key]["values"].append(step_s(tuned, ids))
                after = tuned.swarm.links.total.as_dict()
                results[key]["traffic"] = {k: after[k] - before[k] for k in after}
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench finetune", description=__doc__.splitlines()[0])
    p.add_argument(
        "--link", action="append", choices=("0ms", "20ms", "50ms"), help="repeatable; default 0ms, 20ms"
    )
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server and of this process")
    args = p.parse_args(argv)
    args.link = args.link or ["0ms", "20ms"]
    from bench.models import even_cuts, load_bench_model

    torch.set_num_threads(args.threads)
    model = load_bench_model("smollm2")
    cuts = even_cuts(model.num_blocks, SERVERS)
    ids = batch_of(model.vocab_size, args.batch, args.tokens)
    local = {method: local_step_s(model.path, method, ids, args.runs) for method in METHODS}
    rows = []
    for link_name in args.link:
        results = run_link(model, cuts, link_name, args)
        for (compressor, method), got in results.items():
            traffic = got["traffic"]
            raw = traffic["sent_raw"] + traffic["received_raw"]
            ratio = (traffic["sent_wire"] + traffic["received_wire"]) / raw if raw else 1.0
            floor = local[method] + network_floor_s(
                link_name, args.batch, args.tokens, model.hidden_size, ratio
            )
            median = statistics.median(got["values"])
            rows.append(
                {
                    "link": link_name,
                    "method": method,
                    "compressor": compressor,
                    "step_s": median,
                    "runs": got["values"],
                    "local_compute_s": local[method],
                    "floor_s": floor,
                    "vs_floor": median / floor,
                    "client_wire_over_raw": ratio,
                }
            )
    lines = [
        "| link | method | compressor | step s | local compute s | floor s | × floor | client wire/raw |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['link']} | {r['method']} | {r['compressor']} | {r['step_s']:.2f} | {r['local_compute_s']:.2f} "
            f"| {r['floor_s']:.2f} | {r['vs_floor']:.2f} | {r['client_wire_over_raw']:.3f} |"
        )
    print("\n".join(lines))
    meta = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": "python -m bench finetune " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": "smollm2 fp32, 2 servers",
        "batch": args.batch,
        "tokens": args.tokens,
        "threads": args.threads,
        "load_average": os.getloadavg()[0],
    }
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
