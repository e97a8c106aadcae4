"""What the HTTP API runs for one request: a generation in its own thread and inference session.

Each request is one :class:`Generation`: the prompt's token ids, its sampling parameters and its stop
strings. :meth:`Engine.run` generates it with transformers' ``generate`` (or, for greedy requests, the
server's decoding strategy: speculative decoding included) in the calling thread, and reports text as it
becomes final through ``emit``. Concurrent requests run in concurrent threads, each with its own
inference session on the servers (the model's active session is per thread).

A request ends early by raising from the streamer inside ``generate``: when a stop string appears, or
when its caller is gone (``cancelled``). Either way the ``inference_session`` block closes, and the
servers free that session's caches.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from bloombee_core.api.text import StopFinder, TokenText

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from bloombee_core.client.model import DistributedModelForCausalLM
    from bloombee_core.registry import PluginSet
    from bloombee_core.settings import PluginChoice

TOP_LOGPROBS = 20  # the most alternatives per token a request may ask for (OpenAI's limit)


class ApiError(Exception):
    """A request the API refuses or cannot serve: its HTTP status and OpenAI error type and code."""

    def __init__(
        self, status: int, message: str, kind: str, code: str | None = None, param: str | None = None
    ):
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


@dataclass
class Generation:
    """One request's generation: prompt, limits, sampling and what to report."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's, and k alternatives each

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Piece:
    """Text that became final, and (if asked) the log-probabilities of the tokens that made it."""

    text: str
    logprobs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Outcome:
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    route: list[dict[str, Any]]
    decoding: dict[str, Any]  # how it was decoded: {"name": ...} (speculative: and its rounds)
    first_token_s: float | None  # from the start of the request to its first new token
    seconds: float


class Cancelled(Exception):
    """The caller went away: the generation stops and its session closes."""


class _StopReached(Exception):
    pass


class _Sampler:
    """A logits processor that picks the next token itself and hands ``generate`` only that token (a
    one-hot score), so every request samples from its own seeded generator, whatever other threads do.
    Greedy requests keep the scores as they are (``generate`` takes their argmax). Records each chosen
    token's log-probability when asked."""

    def __init__(self, generation: Generation) -> None:
        seed = generation.seed if generation.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        self.generation = generation
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        g = self.generation
        if g.greedy:
            chosen = scores.argmax(dim=-1)
        else:
            probs = torch.softmax(scores.float() / g.temperature, dim=-1)
            if g.top_p < 1.0:
                probs = _nucleus(probs, g.top_p)
            chosen = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
        if g.logprobs is not None:
            logp = torch.log_softmax(scores[0].float(), dim=-1)
            top = torch.topk(logp, g.logprobs) if g.logprobs else None
            alternatives = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top else []
            self.logprobs.append((float(logp[chosen[0]]), alternatives))
        if g.greedy:
            return scores
        picked = torch.full_like(scores, float("-inf"))
        picked.scatter_(-1, chosen.unsqueeze(-1), 0.0)
        return picked


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` with only the smallest set of most likely tokens whose mass reaches ``top_p`` kept."""
    ordered, order = probs.sort(dim=-1, descending=True)
    before = ordered.cumsum(dim=-1) - ordered  # the mass of the tokens ranked above each one
    ordered[before >= top_p] = 0.0
    return torch.zeros_like(probs).scatter_(-1, order, ordered)


class _Streamer:
    """What ``generate`` streams tokens into: text made final (stop strings held back until they cannot
    start one), cancellation checked at every token."""

    def __init__(
        self,
        engine: Engine,
        generation: Generation,
        sampler: _Sampler,
        emit: Callable[[Piece], None],
        cancelled: threading.Event,
    ) -> None:
        self.engine, self.sampler, self.emit, self.cancelled = engine, sampler, emit, cancelled
        self.text = TokenText(engine.tokenizer)
        self.stops = StopFinder(generation.stop)
        self.prompt_seen = False
        self.tokens: list[int] = []
        self.first_token_at: float | None = None
        self.route: list[dict[str, Any]] = []
        self.stopped = False
        self._sent_logprobs = 0

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate streams the prompt first
            self.prompt_seen = True
            return
        if self.cancelled.is_set():
            raise Cancelled
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            self.route = self.engine.route()
        for token in value.reshape(-1).tolist():
            self.tokens.append(int(token))
            if token not in self.engine.eos:
                self.text.add(int(token))
            final, stopped = self.stops.feed(self.text.final())
            self._emit(final)
            if stopped:
                self.stopped = True
                raise _StopReached

    def end(self) -> None:
        # The route after any fail-over; kept as it was when the session has closed already.
        self.route = self.engine.route() or self.route
        final, _ = self.stops.feed(self.text.final(flush=True), flush=True)
        self._emit(final)

    def _emit(self, text: str) -> None:
        logprobs = self._logprobs()
        if text or logprobs:
            self.emit(Piece(text, logprobs))

    def _logprobs(self) -> list[dict[str, Any]]:
        """Entries for the tokens generated since the last piece (aligned with the sampler's records)."""
        records = self.sampler.logprobs
        out = []
        tokenizer = self.engine.tokenizer
        for index in range(self._sent_logprobs, min(len(records), len(self.tokens))):
            chosen, alternatives = records[index]
            token = self.tokens[index]
            out.append(
                {
                    "token": tokenizer.decode([token]),
                    "logprob": chosen,
                    "top": [(tokenizer.decode([t]), lp) for t, lp in alternatives],
                }
            )
        self._sent_logprobs += len(out)
        return out


class _Pool:
    """Decoding-strategy instances, one per running request (a strategy keeps per-run state, e.g. a
    drafter's), made as needed and reused (a draft model loads once per instance)."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make, self.free, self.lock = make, [], threading.Lock()

    @contextmanager
    def take(self) -> Iterator[Any]:
        with self.lock:
            item = self.free.pop() if self.free else None
        item = item if item is not None else self.make()
        try:
            yield item
        finally:
            with self.lock:
                self.free.append(item)


class Engine:
    """The API's model: a distributed client model, its tokenizer, and the server's decoding strategy."""

    def __init__(
        self,
        model: DistributedModelForCausalLM,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        plugins: PluginSet | None = None,
        decoding: PluginChoice | None = None,
        default_max_tokens: int = 512,
    ) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.default_max_tokens = default_max_tokens
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.strategies: _Pool | None = None  # greedy and sampling: the request's own parameters decide
        if decoding is not None and plugins is not None:
            pool = _Pool(lambda: plugins.create("decoding_strategies", decoding, "client.decoding"))
            first = pool.make()
            if _runs_its_own_loop(first):
                pool.free.append(first)
                self.strategies = pool

    # ---- prompts -------------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise invalid(f"model {self.name} has no chat template: use /v1/completions", "messages")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.text_prompt(text, special=False)

    def text_prompt(self, text: str, special: bool = True) -> list[int]:
        """Token ids of ``text``; ``special``: with the tokenizer's own added tokens (a chat template
        writes them itself)."""
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def limit(self, prompt_tokens: int, max_tokens: int | None, prompt_field: str) -> int:
        """The number of new tokens a request may generate, or an error naming ``prompt_field`` (the
        request's ``prompt`` or ``messages``)."""
        if prompt_tokens == 0:
            raise invalid("the prompt is empty", prompt_field)
        room = self.context_length - prompt_tokens
        wanted = max_tokens if max_tokens is not None else 1
        if wanted > room:
            raise invalid(
                f"This model's maximum context length is {self.context_length} tokens. However, you "
                f"requested {prompt_tokens + wanted} tokens ({prompt_tokens} in the prompt, {wanted} in "
                "the completion). Please reduce the prompt or the completion length.",
                prompt_field,
                "context_length_exceeded",
            )
        return max_tokens if max_tokens is not None else min(room, self.default_max_tokens)

    # ---- the swarm -----------------------------------------------------------------------------

    def missing_blocks(self, force: bool = False) -> list[tuple[int, int]]:
        """Block ranges no online server holds, from the DHT records (``force``: fetched afresh)."""
        swarm = self.model.swarm
        servers = self.model.loop.run(swarm.refresh(force), timeout=30)
        covered = [False] * swarm.num_blocks
        for record in servers.values():
            if record.state == "online":
                for block in range(max(record.start, 0), min(record.end, swarm.num_blocks)):
                    covered[block] = True
        ranges: list[tuple[int, int]] = []
        for block, ok in enumerate(covered):
            if not ok:
                if ranges and ranges[-1][1] == block:
                    ranges[-1] = (ranges[-1][0], block + 1)
                else:
                    ranges.append((block, block + 1))
        return ranges

    def check_swarm(self) -> None:
        """A 503 naming the blocks no server holds (checked again on fresh records before it is said)."""
        if self.missing_blocks() and (missing := self.missing_blocks(force=True)):
            raise unavailable(missing, self.model.swarm.num_blocks)

    def route(self) -> list[dict[str, Any]]:
        """Which server runs which blocks for the current thread's session."""
        session = self.model._session
        hops = session.route if session is not None else []
        return [{"peer": h.peer, "blocks": [h.start, h.end]} for h in hops]

    # ---- one generation ------------------------------------------------------------------------

    def run(
        self, generation: Generation, emit: Callable[[Piece], None], cancelled: threading.Event
    ) -> Outcome:
        """Generate ``generation`` in this thread; text reaches ``emit`` as it becomes final.

        :raises Cancelled: once ``cancelled`` is set (its session is closed by then).
        """
        from transformers import LogitsProcessorList

        begin = time.perf_counter()
        ids = torch.tensor([generation.prompt_ids], dtype=torch.long)
        sampler = _Sampler(generation)
        streamer = _Streamer(self, generation, sampler, emit, cancelled)
        kwargs: dict[str, Any] = {
            "max_new_tokens": generation.max_tokens,
            "attention_mask": torch.ones_like(ids),
            "streamer": streamer,
            "do_sample": False,  # the sampler picks sampled tokens itself
            "pad_token_id": self.model.generation_config.pad_token_id,
        }
        decoding: dict[str, Any] = {"name": "greedy" if generation.greedy else "sampling"}
        try:
            with torch.no_grad():
                if generation.greedy and generation.logprobs is None and self.strategies is not None:
                    with self.strategies.take() as strategy:
                        decoding = {"name": strategy.name}
                        try:
                            strategy.generate(self.model, ids, **kwargs)
                        finally:
                            stats = getattr(strategy, "last_stats", None) or {}
                            decoding.update({k: stats[k] for k in ("rounds", "tokens") if k in stats})
                else:
                    self.model.generate(ids, logits_processor=LogitsProcessorList([sampler]), **kwargs)
        except _StopReached:
            pass
        count = len(streamer.tokens)
        hit_eos = bool(streamer.tokens) and streamer.tokens[-1] in self.eos
        return Outcome(
            finish_reason="stop"
            if streamer.stopped or hit_eos or count < generation.max_tokens
            else "length",
            prompt_tokens=len(generation.prompt_ids),
            completion_tokens=count,
            route=streamer.route,
            decoding=decoding,
            first_token_s=streamer.first_token_at - begin if streamer.first_token_at else None,
            seconds=time.perf_counter() - begin,
        )


def _runs_its_own_loop(strategy: Any) -> bool:
    """Whether greedy requests go through ``strategy``: one with a generation loop of its own
    (speculative decoding) that decodes greedily. A strategy that only sets ``generate``'s arguments
    (greedy, sampling) gives way to each request's temperature, top_p and seed."""
    from bloombee_core.decoding import DecodingStrategy

    own_loop = type(strategy).generate is not DecodingStrategy.generate
    return own_loop and not strategy.generation_kwargs().get("do_sample", False)


def unavailable(missing: list[tuple[int, int]], num_blocks: int) -> ApiError:
    spans = ", ".join(f"{a}:{b}" for a, b in missing)
    return ApiError(
        503,
        f"the swarm cannot serve this model now: no server holds blocks {spans} (of 0:{num_blocks}); "
        "start a server for them or retry later",
        "service_unavailable",
        "blocks_missing",
    )
