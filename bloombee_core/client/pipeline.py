"""The micro-batch pipeline and chunked prefill: how big the pieces are, and batched ``generate`` run
as concurrent micro-batches.

A chain of N servers computes one step at a time per session; while a step travels or another server
computes, a server idles. Two ways fill that time:

* **micro-batches** (decode): the batch's rows are split into groups, each generated in an inference
  session of its own (own server-side sessions and KV caches); the groups run at once, so server i
  computes group j+1 while server i+1 computes group j, and the client samples group j's next token
  while the others travel. :func:`generate_micro_batches` runs transformers' own ``generate`` once per
  group, each in a thread (``LoopThread.run`` may be called from any thread), and pads the outputs back
  into one tensor, exactly what the unsplit call returns.
* **chunked prefill**: a long prompt goes as consecutive steps of one session without waiting for
  replies (:meth:`InferenceSession.step`); server 2 computes chunk 1 while server 1 computes chunk 2.

``auto`` sizes come from a cost model of the chain (:func:`predicted_rate`): measured round trips, the
throughput each server announces and the client's own LM-head time. Pure functions first; the model
is only read by :func:`chain_costs` and the generate wrapper.
"""

from __future__ import annotations

import math
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from bloombee_core.client.model import DistributedModelForCausalLM

Size = int | Literal["auto"]
MAX_MICRO_BATCHES = 8  # sessions one generate opens at most (each holds a KV cache on every server)
MIN_GAIN = 1.25  # the pipeline must be predicted this much faster than one micro-batch, or it stays off
ROW_COST = 0.05  # extra cost of one more row in a server's decode step, as a fraction of a 1-row step,
# for servers that announce none (each server measures its own at start: ServerRecord.row_cost)
# Fixed costs of one more step, whatever its rows: the client's bookkeeping in transformers' generate loop
# (cProfile of a 64-token generate: about 3 ms a token), and each server's framework cost of a step
# (`python -m bench defaults`: 3.0 ms per hop over the floor, default and tuned setups alike). Every
# extra micro-batch pays both again on every step, which is why small splits lose on fast steps.
STEP_OVERHEAD_S = 0.003
HOP_OVERHEAD_S = 0.003
MIN_PREFILL_CHUNK = 256  # tokens: below this a chunk's fixed per-step cost is no longer negligible


@dataclass(frozen=True)
class ChainCosts:
    """What one decode step of a session costs along a chain (seconds).

    ``latency_s`` is the sum of one-way delays over the N+1 hops (client → s1 → … → sN → client);
    ``server_step_s`` each server's cost of a 1-row decode step; ``client_row_s`` and ``client_step_s``
    the client's embeddings + LM head + sampling per row and per step.
    """

    latency_s: float
    server_step_s: tuple[float, ...]
    client_step_s: float = STEP_OVERHEAD_S
    client_row_s: float = 0.0
    row_cost: float = ROW_COST
    hop_overhead_s: float = HOP_OVERHEAD_S
    shared_cores: int | None = None  # every stage runs on this many cores of one host (all on loopback)

    def server_s(self, rows: int) -> list[float]:
        return [self.hop_overhead_s + t * (1 + self.row_cost * (rows - 1)) for t in self.server_step_s]

    def client_s(self, rows: int) -> float:
        return self.client_step_s + self.client_row_s * rows


def group_sizes(batch: int, size: int) -> list[int]:
    """Rows per micro-batch when ``batch`` rows are cut into groups of ``size`` (the last may be smaller)."""
    if batch < 1 or size < 1:
        raise ValueError(f"batch and micro-batch size must be at least 1, got {batch} and {size}")
    return [min(size, batch - start) for start in range(0, batch, size)]


def predicted_rate(costs: ChainCosts, batch: int, size: int) -> float:
    """Rows stepped per second with micro-batches of ``size`` rows: every group cycles through the chain
    independently (latency + each stage's compute) unless a stage is saturated, in which case that
    stage's time for all groups bounds the round."""
    groups = group_sizes(batch, size)
    cycle = max(costs.latency_s + costs.client_s(g) + sum(costs.server_s(g)) for g in groups)
    stages = [sum(costs.client_s(g) for g in groups)]
    stages += [sum(costs.server_s(g)[i] for g in groups) for i in range(len(costs.server_step_s))]
    if costs.shared_cores:  # one host's cores do every stage's work, and each hop's transfer too
        hops = len(costs.server_step_s) + 1
        stages.append((sum(stages) + len(groups) * hops * costs.hop_overhead_s) / costs.shared_cores)
    return batch / max(cycle, *stages)


def choose_micro_batch(costs: ChainCosts, batch: int) -> int:
    """The micro-batch size ``auto`` picks: the predicted fastest, and the whole batch (no pipeline)
    unless splitting is predicted at least :data:`MIN_GAIN` times faster."""
    if batch <= 1:
        return max(batch, 1)
    if costs.shared_cores is not None and costs.shared_cores <= len(costs.server_step_s) + 1:
        # every stage on one host with no more cores than stages: they cannot overlap, and measured
        # on 2 cores each split was slower or barely faster (docs/pipeline.md)
        return batch
    whole = predicted_rate(costs, batch, batch)
    best, best_rate = batch, whole
    for count in range(2, min(batch, MAX_MICRO_BATCHES) + 1):
        size = math.ceil(batch / count)
        rate = predicted_rate(costs, batch, size)
        if rate > best_rate * 1.02:  # a larger size wins near-ties: fewer sessions, fewer bytes
            best, best_rate = size, rate
    return best if best_rate >= MIN_GAIN * whole else batch


def prefill_chunks(tokens: int, servers: int, chunk: Size) -> list[tuple[int, int]]:
    """``[start, end)`` token ranges a prefill of ``tokens`` is sent in. ``auto`` cuts only with two or
    more servers, into about 2N chunks of at least :data:`MIN_PREFILL_CHUNK` tokens (bubble
    (N−1)/(3N−1)); ``0`` never cuts."""
    if chunk == "auto":
        count = min(2 * servers, tokens // MIN_PREFILL_CHUNK, MAX_MICRO_BATCHES) if servers > 1 else 1
        chunk = math.ceil(tokens / max(count, 1))
    if not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"prefill_chunk must be 'auto', 0 (off) or a number of tokens, got {chunk!r}")
    if chunk == 0 or chunk >= tokens:
        return [(0, tokens)]
    return [(a, min(a + chunk, tokens)) for a in range(0, tokens, chunk)]


def check_size(value: Any, name: str) -> Size:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise ValueError(f"{name} must be 'auto' or a non-negative integer, got {value!r}")


class PipelineStats:
    """Evidence that the pipeline ran: sessions open at once, decode steps in flight at once (across
    micro-batches), prefill chunks in flight at once (one session)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = {"sessions": 0, "steps": 0}
        self.most = {"sessions": 0, "steps": 0, "chunks": 0}
        self.runs = 0  # generate calls split into micro-batches

    def enter(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1
            self.most[kind] = max(self.most[kind], self.counts[kind])

    def leave(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] -= 1

    def chunks(self, count: int) -> None:
        with self._lock:
            self.most["chunks"] = max(self.most["chunks"], count)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {"runs": self.runs, **{f"most_{k}_at_once": v for k, v in self.most.items()}}

    def reset(self) -> None:
        with self._lock:
            self.most = dict.fromkeys(self.most, 0)
            self.runs = 0


# ---- reading the costs of a live chain ------------------------------------------------------------
def chain_costs(model: DistributedModelForCausalLM, batch: int) -> ChainCosts:
    """Costs of the chain ``model`` would route now: round trips it measured, throughput servers announce,
    and the client's own step time for 1 and ``batch`` rows (measured once per batch size)."""
    swarm = model.swarm
    hops = model.loop.run(swarm.route(0, swarm.num_blocks))
    one_way = [swarm.rtt.get(h.peer, 0.0) / 2 for h in hops]
    latency = sum(one_way) + (one_way[-1] if one_way else 0.0)  # back from the last server
    steps, row_costs = [], []
    for hop in hops:
        record = swarm.servers.get(hop.peer)
        share = (hop.end - hop.start) / max(record.end - record.start, 1) if record else 1.0
        steps.append(share / record.throughput if record and record.throughput > 0 else 0.0)
        if record is not None and record.row_cost is not None:
            row_costs.append(record.row_cost)
    one, many = _client_step_s(model, 1), _client_step_s(model, batch)
    per_row = max(many - one, 0.0) / max(batch - 1, 1)
    client_step = STEP_OVERHEAD_S + max(one - per_row, 0.0)
    row_cost = max(row_costs) if row_costs else ROW_COST  # the servers' own measurement where announced
    records = [swarm.servers.get(hop.peer) for hop in hops]
    local = bool(records) and all(r is not None and r.addrs and all(map(_loopback, r.addrs)) for r in records)
    cores = _usable_cores() if local else None
    return ChainCosts(latency, tuple(steps), client_step, per_row, row_cost, shared_cores=cores)


def _usable_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one, e.g. not on macOS)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def _loopback(multiaddr: str) -> bool:
    """A multiaddr on this host's loopback interface (``/ip4/127.x.x.x/...``, ``/ip6/::1/...``)."""
    return multiaddr.startswith("/ip4/127.") or multiaddr.startswith("/ip6/::1/")


def _client_step_s(model: DistributedModelForCausalLM, rows: int) -> float:
    cache = model.__dict__.setdefault("_client_step_s", {})
    if rows not in cache:
        ids = torch.zeros(rows, 1, dtype=torch.long)
        with torch.no_grad():
            model.client.logits(model.client.embed(ids))  # warm-up
            begin = time.perf_counter()
            model.client.logits(model.client.embed(ids)).argmax(-1)
            cache[rows] = time.perf_counter() - begin
    return cache[rows]


# ---- batched generate as concurrent micro-batches -------------------------------------------------
_UNSPLITTABLE = ("inputs_embeds", "streamer", "assistant_model", "prefix_allowed_tokens_fn")


def micro_batch_size(
    model: DistributedModelForCausalLM, ids: torch.Tensor | None, kwargs: dict[str, Any]
) -> int:
    """Rows per micro-batch for this ``generate`` call, 0 for none (the batch stays whole). Pops
    ``micro_batch`` from ``kwargs``."""
    chosen = check_size(kwargs.pop("micro_batch", model.micro_batch), "micro_batch")
    batch = ids.shape[0] if ids is not None and ids.ndim == 2 else 1
    config = kwargs.get("generation_config") or model.generation_config
    blocked = [k for k in _UNSPLITTABLE if kwargs.get(k) is not None]
    blocked += [k for k in ("return_dict_in_generate", "output_scores", "output_logits") if kwargs.get(k)]
    if (kwargs.get("num_beams") or config.num_beams or 1) > 1:
        blocked.append("num_beams")
    if chosen == "auto":
        # sampling in micro-batches draws from the global RNG in arrival order: a seed would no longer
        # fix the output, so auto leaves sampled batches whole (ask for micro_batch=N to split them)
        if blocked or batch <= 1 or kwargs.get("do_sample", config.do_sample):
            return 0
        chosen = choose_micro_batch(chain_costs(model, batch), batch)
    elif blocked and 0 < chosen < batch:
        raise ValueError(f"micro_batch={chosen} cannot split a generate call with {', '.join(blocked)}")
    return chosen if 0 < chosen < batch else 0


def generate_micro_batches(
    model: DistributedModelForCausalLM,
    ids: torch.Tensor,
    size: int,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """``generate`` of ``ids`` in groups of ``size`` rows, all at once, each in its own inference session;
    the outputs padded to one length (what the unsplit call gives: finished rows carry padding)."""
    from transformers import GenerationMixin

    from bloombee_core.client.handle import InferenceSessionHandle, RemoteCache

    mask = kwargs.pop("attention_mask", None)
    kwargs.pop("input_ids", None)
    length = model._max_length(ids.shape[1], kwargs)
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()
    bounds = [(a, min(a + size, ids.shape[0])) for a in range(0, ids.shape[0], size)]
    # one group for all micro-batches: a server that batched them together would run them in lockstep
    # again (each stage waiting for the whole batch), which is what the pipeline is there to avoid
    pipeline = secrets.token_hex(8)

    def one(a: int, b: int) -> torch.Tensor:
        handle = InferenceSessionHandle(model, length, group=pipeline)
        model.pipeline_stats.enter("sessions")
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                rows = {"attention_mask": mask[a:b]} if mask is not None else {}
                return GenerationMixin.generate(
                    model, ids[a:b], *args, cache=RemoteCache(handle), **rows, **kwargs
                )
        finally:
            model.pipeline_stats.leave("sessions")
            handle.close()

    model.pipeline_stats.runs += 1
    with ThreadPoolExecutor(len(bounds), thread_name_prefix="bloombee-micro-batch") as pool:
        outs = [f.result() for f in [pool.submit(one, a, b) for a, b in bounds]]
    width = max(o.shape[1] for o in outs)
    if any(o.shape[1] != width for o in outs):
        pad = _pad_token(model, kwargs)
        outs = [torch.nn.functional.pad(o, (0, width - o.shape[1]), value=pad) for o in outs]
    return torch.cat(outs, dim=0)


def _pad_token(model: DistributedModelForCausalLM, kwargs: dict[str, Any]) -> int:
    config = kwargs.get("generation_config") or model.generation_config
    for value in (
        kwargs.get("pad_token_id"),
        config.pad_token_id,
        kwargs.get("eos_token_id"),
        config.eos_token_id,
    ):
        if isinstance(value, list | tuple) and value:
            value = value[0]
        if value is not None:
            return int(value)
    return 0
