"""The ``speculative`` decoding strategy: a drafter proposes token trees, the swarm scores every node of
every tree in one pass, and the longest path the target agrees with is kept.

One round, for a batch: each sequence's root (its last token, not yet in the servers' caches) and its
draft tree's nodes go to the servers as one tree step (parent indices; each node sees the prefix and its
ancestors). Verification walks each tree from the root, deciding every next token from the target's own
distribution at that node — greedy: its argmax; sampling: speculative sampling, which preserves the
target distribution (``verify.py``). The accepted nodes and the decided "bonus" token are committed; the
next step tells every server which rows of this step to keep (the root and the accepted path), so the
caches drop the rejected branches. Rows of a batch accept different numbers of tokens: the shorter ones
keep padding rows the mask then hides. With greedy decoding the output is plain greedy decoding's,
whatever the drafter proposes.

How deep to draft comes from :class:`~bloombee_decoding.cost_model.DraftPlanner`, fed each round with
the measured round time and acceptance; where drafts do not pay, rounds are plain steps (a tree of no
nodes), with a small probe now and then.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from bloombee_core.decoding import DecodingStrategy
from bloombee_core.plugin import PluginOptions
from bloombee_core.settings import PluginChoice, choice

if TYPE_CHECKING:
    import torch

    from bloombee_core.client.model import DistributedModelForCausalLM
    from bloombee_core.drafting import Drafter, DraftTree
    from bloombee_decoding.cost_model import DraftPlanner


class SpeculativeOptions(PluginOptions):
    drafter: PluginChoice = choice(
        "prompt-lookup", 'the drafter and its options: a name or {name = "early-exit", blocks = 4}'
    )
    max_nodes: int = Field(
        default=16, ge=1, le=255, description="draft tokens per sequence and round at most"
    )
    max_depth: int = Field(default=8, ge=1, le=64, description="draft tree depth at most")
    adaptive: bool = Field(
        default=True,
        description="size trees from measured acceptance and round times; plain steps where drafts do not pay",
    )
    do_sample: bool = Field(default=False, description="speculative sampling instead of greedy decoding")
    temperature: float = Field(default=1.0, gt=0.0, description="sampling: logits are divided by this")
    top_k: int = Field(default=50, ge=0, description="sampling: most likely tokens kept; 0 keeps all")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="sampling: nucleus mass kept")
    seed: int | None = Field(
        default=None,
        ge=0,
        description="sampling: seeds the draws so that a run repeats (trees then keep a fixed size: "
        "adaptive sizing follows measured times)",
    )


class SpeculativeDecoding(DecodingStrategy):
    """Draft, verify in one pass, keep the longest agreed path (see the module docstring)."""

    name: ClassVar[str] = "speculative"
    description: ClassVar[str] = "speculative decoding: drafted token trees verified by the swarm in one pass"
    Options: ClassVar[type[PluginOptions]] = SpeculativeOptions

    def __init__(self, options: PluginOptions | None = None) -> None:
        super().__init__(options)
        self.last_stats: dict[str, Any] = {}
        self._drafter: tuple[object, Drafter] | None = None  # (the registry it came from, the drafter)

    def generation_kwargs(self) -> dict[str, Any]:
        return {"do_sample": self.options.do_sample}

    def generate(
        self, model: DistributedModelForCausalLM, input_ids: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        """Like ``model.generate(input_ids, max_new_tokens=..., attention_mask=..., streamer=...)``:
        prompt + new tokens, rows that ended early padded after their end-of-sequence token."""
        import torch

        from bloombee_decoding.cost_model import DraftPlanner

        options = self.options
        config = model.generation_config
        max_new = int(kwargs.get("max_new_tokens") or config.max_new_tokens or 20)
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask.to(torch.int64)
        eos = _token_ids(kwargs.get("eos_token_id", config.eos_token_id))
        pad = kwargs.get("pad_token_id", config.pad_token_id)
        pad = pad if pad is not None else (eos[0] if eos else 0)
        streamer = kwargs.get("streamer")
        generator = torch.Generator().manual_seed(options.seed) if options.seed is not None else None
        if model.plugins is None:
            raise RuntimeError(
                "speculative decoding needs the model's plugins (load it with from_pretrained)"
            )
        if self._drafter is None or self._drafter[0] is not model.plugins:  # kept: a draft model loads once
            self._drafter = (
                model.plugins,
                model.plugins.create("drafters", options.drafter, "client.decoding.drafter"),
            )
        drafter = self._drafter[1]
        # Weak priors (half a success, half a failure): a drafter that keeps failing is dropped within
        # a few rounds. A seeded run must repeat, so its tree sizes may not follow measured times.
        adaptive = options.adaptive and options.seed is None
        planner = DraftPlanner(prior_successes=0.5, prior_failures=0.5) if adaptive else None
        batch, prompt = input_ids.shape
        sequences = [
            [int(t) for t, m in zip(row, keep, strict=True) if m]
            for row, keep in zip(input_ids.tolist(), mask.tolist(), strict=True)
        ]
        new: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * batch
        stats = _Stats(options.max_depth)
        if streamer is not None:
            streamer.put(input_ids)  # as generate does: a streamer skipping the prompt skips this
        drafter.begin(model, batch)
        try:
            # One sequence's cache grows by what it commits; a batch's by its best row's each round.
            growth = max_new if batch == 1 else max_new * (1 + options.max_depth)
            with model.inference_session(prompt + growth + options.max_nodes + 2, trees=True) as session:
                positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
                hidden = session.step_tokens(input_ids, positions, mask)
                for b in range(batch):
                    token = self._decide(model, hidden[b, -1], generator)
                    self._commit(b, [token], new, done, eos, max_new, streamer, batch)
                cache_mask, keep = mask, None
                lengths = mask.sum(-1).tolist()
                while not all(done):
                    left = max(max_new - len(n) for n, d in zip(new, done, strict=True) if not d)
                    depth = self._plan_depth(planner, stats, min(options.max_depth, left - 1), batch)
                    begin = time.perf_counter()  # a round costs its drafting too
                    contexts = [s + n for s, n in zip(sequences, new, strict=True)]
                    trees = [_empty()] * batch
                    if depth > 0:
                        trees = drafter.propose(contexts, options.max_nodes, depth)
                    trees = [t if not d else _empty() for t, d in zip(trees, done, strict=True)]
                    tokens, parents, positions = _pack([c[-1] for c in contexts], trees, lengths)
                    step_mask = torch.cat([cache_mask, torch.ones_like(tokens)], dim=1)
                    hidden = session.step_tokens(tokens, positions, step_mask, parents, keep)
                    rows, accepted_tokens = [], []
                    for b in range(batch):
                        path, token = self._verify(model, trees[b], hidden[b], generator)
                        rows.append([0, *(i + 1 for i in path)])
                        accepted_tokens.append([trees[b].tokens[i] for i in path] + [token])
                        stats.observe(trees[b], len(path), done[b])
                        if planner is not None and not done[b] and len(trees[b]):
                            planner.observe_acceptance(len(path), max(trees[b].depths()))
                    if planner is not None:
                        planner.observe_round(tokens.shape[1], time.perf_counter() - begin, batch)
                    for b in range(batch):
                        if not done[b]:
                            self._commit(b, accepted_tokens[b], new, done, eos, max_new, streamer, batch)
                    keep, kept = _keep_rows(rows)
                    cache_mask = torch.cat([cache_mask, kept], dim=1)
                    lengths = [n + len(r) for n, r in zip(lengths, rows, strict=True)]
                session.speculation = stats.report()
                self.last_stats = session.speculation
        finally:
            drafter.end()
        if streamer is not None:
            streamer.end()
        return _sequences(input_ids, new, pad)

    def _plan_depth(self, planner: DraftPlanner | None, stats: _Stats, most: int, batch: int) -> int:
        """How deep to draft this round: ``most`` without a planner, else what the planner finds pays."""
        depth = most
        if planner is not None and most > 0:
            width, limit = stats.nodes_per_depth, self.options.max_nodes  # price the trees really sent

            def nodes(d: int) -> int:
                return min(limit, max(d, round(width * d)))

            depth = min(most, planner.plan(limit, most, batch, nodes))
            stats.predicted.append(planner.predicted_tokens_per_round())
        stats.planned.append(depth)
        return depth

    # ---- one node's decision, one tree's verification -------------------------------------------
    def _distribution(self, model: DistributedModelForCausalLM, hidden: torch.Tensor) -> torch.Tensor:
        from bloombee_decoding.verify import Processing

        logits = model.client.logits(hidden[None, None].to(model.dtype))[0, 0]
        if not self.options.do_sample:
            return logits
        o = self.options
        return Processing(o.temperature, o.top_k, o.top_p).target_probs(logits)

    def _decide(self, model: DistributedModelForCausalLM, hidden: torch.Tensor, generator: Any) -> int:
        import torch

        scores = self._distribution(model, hidden)
        if not self.options.do_sample:
            return int(scores.argmax())
        return int(torch.multinomial(scores, 1, generator=generator))

    def _verify(
        self, model: DistributedModelForCausalLM, tree: DraftTree, hidden: torch.Tensor, generator: Any
    ) -> tuple[list[int], int]:
        """The accepted path (node indices) and the bonus token, computing logits only where needed."""
        from bloombee_decoding.verify import verify_greedy, verify_sampling

        rows = _LazyRows(lambda i: self._distribution(model, hidden[i]))
        if self.options.do_sample:
            return verify_sampling(tree.parents, tree.tokens, rows, generator)
        return verify_greedy(tree.parents, tree.tokens, rows)

    def _commit(
        self,
        b: int,
        tokens: list[int],
        new: list[list[int]],
        done: list[bool],
        eos: list[int],
        max_new: int,
        streamer: Any,
        batch: int,
    ) -> None:
        import torch

        for token in tokens:
            if done[b]:
                break
            new[b].append(token)
            if streamer is not None and batch == 1:
                streamer.put(torch.tensor([token]))
            done[b] = token in eos or len(new[b]) >= max_new


class _LazyRows:
    """``rows[i]``: row ``i`` of a [1 + nodes, vocab] table, computed on first use (the LM head is
    evaluated only on the nodes verification visits)."""

    def __init__(self, make: Any) -> None:
        self.make, self.cache = make, {}

    def __getitem__(self, i: int) -> torch.Tensor:
        if i not in self.cache:
            self.cache[i] = self.make(i)
        return self.cache[i]


class _Stats:
    """What speculation achieved: tokens per round, acceptance by depth."""

    def __init__(self, max_depth: int) -> None:
        self.rounds = 0
        self.plain_rounds = 0  # rounds that carried no draft (the planner found drafting would not pay)
        self.planned: list[int] = []  # the depth planned for each round
        self.predicted: list[float] = []  # the planner's expected tokens for each round it planned
        self.nodes_per_depth = 1.0  # how wide the drafter's trees are (nodes per level), a running mean
        self.tokens = 0
        self.offered = [0] * (max_depth + 1)
        self.accepted = [0] * (max_depth + 1)

    def observe(self, tree: DraftTree, accepted: int, finished: bool) -> None:
        if finished:
            return
        self.rounds += 1
        self.plain_rounds += not len(tree)
        self.tokens += accepted + 1
        deepest = max(tree.depths(), default=0)
        if deepest:
            self.nodes_per_depth = 0.8 * self.nodes_per_depth + 0.2 * len(tree) / deepest
        for depth in range(1, deepest + 1):
            if depth <= accepted + 1:
                self.offered[depth] += 1
                self.accepted[depth] += depth <= accepted

    def report(self) -> dict[str, Any]:
        by_depth = [a / o for a, o in zip(self.accepted[1:], self.offered[1:], strict=True) if o]
        report = {
            "rounds": self.rounds,
            "plain_rounds": self.plain_rounds,
            "tokens": self.tokens,
            "tokens_per_round": self.tokens / self.rounds if self.rounds else 0.0,
            "acceptance_by_depth": by_depth,
            "planned_depths": self.planned,
        }
        if self.predicted:  # what the measured acceptance predicted, on average over the planned rounds
            report["predicted_tokens_per_round"] = sum(self.predicted) / len(self.predicted)
        return report


def _empty() -> DraftTree:
    from bloombee_core.drafting import DraftTree

    return DraftTree()


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]


def _sequences(input_ids: torch.Tensor, new: list[list[int]], pad: int) -> torch.Tensor:
    """Prompt + new tokens per row, as ``generate`` returns them: shorter rows padded at the end."""
    import torch

    batch, prompt = input_ids.shape
    out = torch.full((batch, prompt + max(len(n) for n in new)), pad, dtype=input_ids.dtype)
    out[:, :prompt] = input_ids
    for b, tokens in enumerate(new):
        out[b, prompt : prompt + len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
    return out


def _pack(roots: Sequence[int], trees: Sequence[DraftTree], lengths: Sequence[int]) -> tuple[Any, Any, Any]:
    """One tree step for the batch: [batch, 1 + widest] tokens, parents and positions (root first; a
    narrower tree is padded with children of its root, never verified)."""
    import torch

    width = 1 + max(len(t) for t in trees)
    tokens = torch.zeros(len(trees), width, dtype=torch.int64)
    parents = torch.zeros(len(trees), width, dtype=torch.int64)
    positions = torch.zeros(len(trees), width, dtype=torch.int64)
    for b, (root, tree, length) in enumerate(zip(roots, trees, lengths, strict=True)):
        depth = [0, *tree.depths()] + [1] * (width - 1 - len(tree))
        tokens[b] = torch.tensor([root, *tree.tokens] + [root] * (width - 1 - len(tree)))
        parents[b] = torch.tensor([-1, *(p + 1 for p in tree.parents)] + [0] * (width - 1 - len(tree)))
        positions[b] = length + torch.tensor(depth)
    return tokens, parents, positions


def _keep_rows(rows: list[list[int]]) -> tuple[Any, Any]:
    """The ``keep`` tensor (each row's kept step rows, the shorter ones repeating their last) and the
    mask columns they become (0 where a row only repeats)."""
    import torch

    width = max(len(r) for r in rows)
    keep = torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows], dtype=torch.int64)
    kept = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.int64)
    return keep, kept
