"""Speculative decoding's math: verification keeps exactly the target's tokens (greedy) or its
distribution (sampling), and the planner drafts only when drafting pays."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import asdict

import pytest
import torch
from bloombee_decoding.cost_model import DraftPlanner
from bloombee_decoding.verify import Processing, emitted_tokens, verify_batch, verify_greedy, verify_sampling
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from bloombee_core.drafting import DraftTree

VOCAB = 6
DRAWS = 20_000
P_MIN = 1e-3


def one_hot_logits(best_tokens: list[int]) -> torch.Tensor:
    """Rows whose argmax is ``best_tokens[row]``."""
    logits = torch.randn(len(best_tokens), VOCAB, generator=torch.Generator().manual_seed(1))
    for row, token in enumerate(best_tokens):
        logits[row, token] = 10.0
    return logits


# -- greedy -------------------------------------------------------------------------------------


def test_greedy_follows_the_argmax_along_a_chain_and_adds_the_next_one() -> None:
    logits = one_hot_logits([3, 1, 4, 5])  # root says 3, node 0 says 1, node 1 says 4, node 2 says 5
    assert verify_greedy([-1, 0, 1], [3, 1, 4], logits) == ([0, 1, 2], 5)


def test_greedy_stops_at_the_first_wrong_child() -> None:
    logits = one_hot_logits([3, 1, 4, 5])
    assert verify_greedy([-1, 0, 1], [3, 2, 4], logits) == ([0], 1)
    assert verify_greedy([-1, 0, 1], [0, 1, 4], logits) == ([], 3)


def test_greedy_picks_the_right_child_among_siblings() -> None:
    # root's children: 0 (tok 2), 1 (tok 3), 2 (tok 5); node 1's children: 3 (tok 0), 4 (tok 1)
    parents, tokens = [-1, -1, -1, 1, 1], [2, 3, 5, 0, 1]
    logits = one_hot_logits([3, 0, 1, 0, 0, 2])  # root -> node 1 (3) -> node 4 (1), then 2
    accepted, bonus = verify_greedy(parents, tokens, logits)
    assert (accepted, bonus) == ([1, 4], 2)
    assert all(verify_greedy(parents, tokens, logits) == (accepted, bonus) for _ in range(5))  # deterministic
    assert emitted_tokens(tokens, accepted, bonus) == [3, 1, 2]


def test_greedy_with_an_empty_tree_is_one_plain_step() -> None:
    assert verify_greedy([], [], one_hot_logits([4])) == ([], 4)


# -- sampling: the target distribution is preserved ---------------------------------------------

# Root candidates: token 2 (likely), 1 (unlikely), 2 again (a duplicate: never chosen), 0, and 4,
# which top-k removes at the root (probability 0). Node 0 and node 3 have children of their own.
PARENTS = [-1, -1, -1, -1, -1, 0, 0, 3, 5]
TOKENS = [2, 1, 2, 0, 4, 3, 5, 1, 2]
ROOT_LOGITS = torch.tensor([1.0, -0.5, 2.0, 0.3, -2.0, -3.0])


def target_probs() -> torch.Tensor:
    root = Processing(temperature=0.7, top_k=4).target_probs(ROOT_LOGITS)
    nodes = torch.randn(len(PARENTS), VOCAB, generator=torch.Generator().manual_seed(3))
    return torch.cat([root[None], Processing(top_p=0.8).target_probs(nodes)])


@pytest.fixture(scope="module")
def sampled_rounds() -> tuple[torch.Tensor, list[list[int]]]:
    probs = target_probs()
    generator = torch.Generator().manual_seed(0)
    rounds = []
    for _ in range(DRAWS):
        accepted, bonus = verify_sampling(PARENTS, TOKENS, probs, generator)
        rounds.append(emitted_tokens(TOKENS, accepted, bonus))
    return probs, rounds


def assert_follows(tokens: list[int], p: torch.Tensor) -> None:
    """``tokens`` are draws from ``p``: none where ``p`` is 0, and a chi-square fit elsewhere."""
    counts = Counter(tokens)
    support = [x for x in range(VOCAB) if p[x] > 0]
    assert all(counts[x] == 0 for x in range(VOCAB) if x not in support), (counts, p)
    observed = [counts[x] for x in support]
    expected = [float(p[x]) * len(tokens) for x in support]
    scale = len(tokens) / sum(expected)  # float32 rounding of p
    result = chisquare(observed, [e * scale for e in expected])
    assert result.pvalue > P_MIN, (observed, expected, result)


def test_the_first_token_follows_the_target_at_the_root(sampled_rounds) -> None:
    probs, rounds = sampled_rounds
    assert probs[0, 4] == 0 and probs[0, 2] > 0.5  # the filtered candidate and the likely one
    assert_follows([r[0] for r in rounds], probs[0])
    # the sanity reference: plain sampling, same number of draws, passes the same check
    plain = torch.multinomial(probs[0], DRAWS, replacement=True, generator=torch.Generator().manual_seed(1))
    assert_follows(plain.tolist(), probs[0])


def test_each_next_token_follows_the_target_at_the_node_before_it(sampled_rounds) -> None:
    probs, rounds = sampled_rounds
    # a first token that is a root candidate means that candidate was accepted (node 0, 1 or 3)
    for node in (0, 1, 3):
        seconds = [r[1] for r in rounds if r[0] == TOKENS[node]]
        assert len(seconds) > 300  # node 1 is the unlikely candidate: p = 0.02
        assert_follows(seconds, probs[1 + node])
    thirds = [r[2] for r in rounds if r[:2] == [TOKENS[0], TOKENS[5]]]  # path root -> 0 -> 5
    assert len(thirds) > 500
    assert_follows(thirds, probs[1 + 5])
    assert not [r for r in rounds if r[0] not in (2, 1, 0) and len(r) > 1]  # bonus ends the round


def test_sampling_with_an_empty_tree_is_plain_sampling() -> None:
    p = target_probs()[0]
    generator = torch.Generator().manual_seed(5)
    bonuses = [verify_sampling([], [], p[None], generator) for _ in range(3000)]
    assert all(accepted == [] for accepted, _ in bonuses)
    assert_follows([bonus for _, bonus in bonuses], p)


def test_sampling_is_reproducible_with_a_seeded_generator() -> None:
    probs = target_probs()
    runs = [
        [verify_sampling(PARENTS, TOKENS, probs, g) for _ in range(50)]
        for g in (torch.Generator().manual_seed(9), torch.Generator().manual_seed(9))
    ]
    assert runs[0] == runs[1]


def test_verify_batch_verifies_each_row_of_padded_logits() -> None:
    trees = [DraftTree([3, 1], [-1, 0]), DraftTree([], []), DraftTree([0, 3], [-1, -1])]
    logits = torch.stack([one_hot_logits([3, 1, 4]), one_hot_logits([5, 0, 0]), one_hot_logits([3, 2, 2])])
    assert verify_batch(trees, logits) == [([0, 1], 4), ([], 5), ([1], 2)]
    sampled = verify_batch(trees, logits, Processing(top_k=1), torch.Generator().manual_seed(0))
    assert sampled == [([0, 1], 4), ([], 5), ([1], 2)]  # top_k=1 is greedy


# -- target_probs is what generate samples from -------------------------------------------------


def test_target_probs_equal_transformers_sampling_warpers() -> None:
    logits = torch.randn(2, 3, 40, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    warpers = LogitsProcessorList(
        [TemperatureLogitsWarper(0.6), TopKLogitsWarper(top_k=12), TopPLogitsWarper(top_p=0.85)]
    )
    reference = torch.softmax(warpers(None, logits.float().reshape(6, 40)), dim=-1).reshape(2, 3, 40)
    probs = Processing(temperature=0.6, top_k=12, top_p=0.85).target_probs(logits)
    assert probs.dtype == torch.float32
    assert torch.equal(probs, reference)


def test_target_probs_equal_the_scores_generate_samples_from() -> None:
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config.pad_token_id = 0
    report = {"return_dict_in_generate": True, "output_scores": True, "output_logits": True}
    for processing in (Processing(), Processing(temperature=1.4, top_k=0, top_p=0.7)):
        prompt = torch.tensor([[5, 17, 42]])
        out = model.generate(prompt, do_sample=True, max_new_tokens=1, **asdict(processing), **report)
        expected = torch.softmax(out.scores[0], dim=-1)
        torch.testing.assert_close(processing.target_probs(out.logits[0]), expected, rtol=0, atol=1e-7)


def test_top_k_and_top_p_leave_zeros_outside_what_they_keep() -> None:
    logits = torch.randn(64, generator=torch.Generator().manual_seed(8))
    assert int((Processing().target_probs(logits) > 0).sum()) == 50  # transformers' default top_k
    assert int((Processing(top_k=5).target_probs(logits) > 0).sum()) == 5
    full = torch.softmax(logits, dim=-1)
    kept = Processing(top_k=0, top_p=0.6).target_probs(logits) > 0
    # the smallest set of most likely tokens whose mass reaches top_p
    kept_mass = full[kept].sum()
    assert kept_mass >= 0.6 and kept_mass - full[kept].min() < 0.6
    assert full[kept].min() >= full[~kept].max()
    assert torch.equal(Processing(top_k=0).target_probs(logits), full)


# -- the planner --------------------------------------------------------------------------------


def feed_rounds(planner: DraftPlanner, t0: float, per_token: float, batch_size: int = 1) -> None:
    for tokens in (1, 3, 5, 9, 1, 2, 7, 4):
        planner.observe_round(tokens, t0 + per_token * tokens * batch_size, batch_size)


def feed_acceptance(planner: DraftPlanner, rate: float, depth: int, rounds: int = 200) -> None:
    rng = random.Random(0)
    for _ in range(rounds):
        reached = 0
        while reached < depth and rng.random() < rate:
            reached += 1
        planner.observe_acceptance(reached, depth)


def test_the_fit_recovers_latency_and_per_token_cost() -> None:
    planner = DraftPlanner()
    planner.observe_round(1, 0.065)
    t0, per_token = planner.round_cost()  # before two sizes are seen: the prior shape
    assert t0 == pytest.approx(0.065 / (1 + 1 / 64)) and per_token == pytest.approx(t0 / 64)
    planner = DraftPlanner()
    feed_rounds(planner, 0.04, 0.003)
    assert planner.round_cost() == pytest.approx((0.04, 0.003))


def test_fast_rounds_and_high_acceptance_draft_deep() -> None:
    planner = DraftPlanner()
    feed_rounds(planner, 0.05, 0.0001)
    feed_acceptance(planner, 0.95, 8)
    assert planner.plan(max_nodes=16, max_depth=8) >= 6
    assert planner.plan(max_nodes=16, max_depth=8, nodes_for_depth=lambda d: 4 * d) == 4  # nodes <= 16


def test_acceptance_near_zero_plans_plain_steps_with_periodic_probes() -> None:
    planner = DraftPlanner()
    feed_rounds(planner, 0.05, 0.005)
    feed_acceptance(planner, 0.0, 4)
    answers = [planner.plan(max_nodes=16, max_depth=8) for _ in range(24)]
    assert answers == ([0] * 7 + [2]) * 3
    assert planner.predicted_tokens_per_round() == pytest.approx(planner.expected_tokens(2))


def test_failing_probes_back_off_and_an_accepted_one_restores_the_interval() -> None:
    planner = DraftPlanner()
    feed_rounds(planner, 0.05, 0.005)
    feed_acceptance(planner, 0.0, 4)
    probes = []
    for round_ in range(200):
        depth = planner.plan(max_nodes=16, max_depth=8)
        if depth:
            probes.append(round_)
            planner.observe_acceptance(0, depth)  # every probe fails
    gaps = [b - a for a, b in zip(probes, probes[1:], strict=False)]
    assert gaps[:4] == [16, 32, 64, 64]  # each failure doubles the wait, up to 8 x probe_every
    planner.observe_acceptance(2, 2)  # not a probe: changes nothing
    depth, waited = 0, 0
    while not depth:
        depth, waited = planner.plan(max_nodes=16, max_depth=8), waited + 1
    planner.observe_acceptance(depth, depth)  # this probe is accepted
    assert planner._probe_interval == planner.probe_every


def test_drafting_resumes_through_probes_when_acceptance_recovers() -> None:
    planner = DraftPlanner()
    feed_rounds(planner, 0.05, 0.002)
    rng = random.Random(1)
    history = []
    for round_ in range(120):
        depth = planner.plan(max_nodes=8, max_depth=8)
        rate = 0.0 if round_ < 40 else 0.9  # the drafter starts agreeing with the target
        reached = 0
        while reached < depth and rng.random() < rate:
            reached += 1
        planner.observe_acceptance(reached, depth)
        history.append(depth)
    assert history[20:40].count(0) >= 17  # mostly plain while drafts fail
    assert all(d > 0 for d in history[-40:])  # drafting again, every round


def test_a_large_per_token_cost_plans_plain_steps() -> None:
    planner = DraftPlanner()
    feed_rounds(planner, 0.01, 0.05)  # a slow link: every token costs more than the latency
    feed_acceptance(planner, 0.7, 4)
    assert planner.plan(max_nodes=16, max_depth=8) == 0


def test_the_same_link_drafts_at_batch_1_and_steps_plainly_at_batch_32() -> None:
    planner = DraftPlanner()
    feed_rounds(planner, 0.05, 0.005)
    feed_rounds(planner, 0.05, 0.005, batch_size=32)
    feed_acceptance(planner, 0.8, 4)
    assert planner.plan(max_nodes=16, max_depth=4, batch_size=1) > 0
    assert planner.plan(max_nodes=16, max_depth=4, batch_size=32) == 0


def test_expected_tokens_is_one_plus_the_sum_of_accepted_prefixes() -> None:
    planner = DraftPlanner()
    feed_acceptance(planner, 0.7, 3, rounds=30)
    a = planner.acceptance_by_depth()
    assert len(a) == 3 and a[0] > a[2] > 0
    assert planner.expected_tokens(0) == 1
    assert planner.expected_tokens(3) == pytest.approx(1 + a[0] + a[0] * a[1] + a[0] * a[1] * a[2])


def test_constant_acceptance_gives_the_geometric_tokens_per_round() -> None:
    a = 0.75  # a Beta(3, 1) prior alone: a_d = 0.75 at every depth
    planner = DraftPlanner(prior_successes=3, prior_failures=1)
    for k in range(9):
        assert planner.expected_tokens(k) == pytest.approx((1 - a ** (k + 1)) / (1 - a))


def test_measured_acceptance_predicts_the_tokens_per_round_seen() -> None:
    a, k = 0.6, 4
    planner = DraftPlanner(forgetting=1.0)
    feed_rounds(planner, 0.05, 0.0005)
    rng = random.Random(2)
    emitted = []
    for _ in range(4000):
        reached = 0
        while reached < k and rng.random() < a:
            reached += 1
        planner.observe_acceptance(reached, k)
        emitted.append(reached + 1)
    assert planner.acceptance_by_depth() == pytest.approx([a] * k, abs=0.03)
    assert planner.plan(max_nodes=k, max_depth=k) == k
    assert planner.predicted_tokens_per_round() == pytest.approx((1 - a ** (k + 1)) / (1 - a), rel=0.03)
    assert planner.predicted_tokens_per_round() == pytest.approx(sum(emitted) / len(emitted), rel=0.03)
