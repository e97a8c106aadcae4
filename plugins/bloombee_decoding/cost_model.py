"""How much to draft next round, from what rounds cost and how often drafts are accepted.

A round trip that sends ``n`` tokens per sequence costs about ``t0 + per_token * n`` seconds: ``t0`` is
latency (network hops, kernel launches) and ``per_token`` the compute and bandwidth each extra token
adds. A draft of depth ``D`` yields ``1 + a_1 + a_1 a_2 + ... + a_1...a_D`` tokens, where ``a_d`` is
the chance the target keeps depth ``d`` given it kept depth ``d - 1`` (the bonus token always counts).
Drafting pays while the tokens it adds outweigh the time its extra tokens cost: on a fast local GPU
at batch 1 it pays deep; over a slow link, or at a large batch where each token costs real compute,
a plain step wins, which is why the planner can answer 0.

Trees are treated as chains along the path verification actually took: ``a_d`` is measured from the
depth each round reached, so a wider tree's better odds show up as higher ``a_d``, and its cost through
``nodes_for_depth``. Pure Python, no torch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

__all__ = ["DraftPlanner"]


class DraftPlanner:
    """Adaptive draft size, fed by measurements.

    :param window: rounds kept for the least-squares fit of round time against tokens sent.
    :param forgetting: each acceptance observation first multiplies every depth's counts by this, so
        recent rounds weigh more and depths not offered for a while drift back to the prior.
    :param prior_successes: Beta prior, pseudo-acceptances per depth.
    :param prior_failures: Beta prior, pseudo-rejections per depth.
    :param margin: drafting must beat a plain step's throughput by this fraction to be chosen.
    :param probe_every: after this many plain rounds in a row, one probe round of ``probe_depth``
        keeps the acceptance estimates fresh, so drafting resumes when it starts paying again.
    :param probe_depth: depth of a probe round.
    """

    def __init__(
        self,
        window: int = 32,
        forgetting: float = 0.95,
        prior_successes: float = 1.0,
        prior_failures: float = 1.0,
        margin: float = 0.05,
        probe_every: int = 8,
        probe_depth: int = 2,
    ) -> None:
        if window < 2:
            raise ValueError(f"window must keep at least 2 rounds to fit a line, got {window}")
        if not 0 < forgetting <= 1:
            raise ValueError(f"forgetting must be in (0, 1] (1: never forget), got {forgetting}")
        if prior_successes <= 0 or prior_failures <= 0:
            raise ValueError(
                f"the Beta prior needs positive counts, got {prior_successes} successes / {prior_failures} failures"
            )
        if margin < 0 or probe_every < 1 or probe_depth < 1:
            raise ValueError(
                f"need margin >= 0, probe_every >= 1, probe_depth >= 1; got {margin}, {probe_every}, {probe_depth}"
            )
        self.forgetting = forgetting
        self.prior = (prior_successes, prior_failures)
        self.margin = margin
        self.probe_every = probe_every
        self.probe_depth = probe_depth
        self._rounds: deque[tuple[float, float]] = deque(maxlen=window)  # (tokens in the round, seconds)
        self._successes: list[float] = []  # index d - 1: depth d
        self._failures: list[float] = []
        self._plain_streak = 0
        self._last_depth = 0
        # probes back off while they keep failing (each costs a draft), and come back to probe_every
        # as soon as one is accepted
        self._probe_interval = probe_every
        self._probing = False
        self.max_probe_interval = 8 * probe_every
        self._observed = 0  # rounds of acceptance seen: the first trees grow with the evidence

    # -- measurements ---------------------------------------------------------------------------

    def observe_round(self, tokens_sent: int, seconds: float, batch_size: int = 1) -> None:
        """One round trip that sent ``tokens_sent`` tokens per sequence (root included) for
        ``batch_size`` sequences took ``seconds``. Pass the same ``batch_size`` as to :meth:`plan`."""
        if tokens_sent < 1 or batch_size < 1 or seconds < 0:
            raise ValueError(
                f"a round sends at least the root for at least one sequence in non-negative time, "
                f"got tokens_sent={tokens_sent}, batch_size={batch_size}, seconds={seconds}"
            )
        self._rounds.append((float(tokens_sent * batch_size), float(seconds)))

    def observe_acceptance(self, depth_reached: int, max_depth_offered: int) -> None:
        """One sequence's round: verification kept ``depth_reached`` drafted tokens out of a draft
        ``max_depth_offered`` deep. Depths ``1..depth_reached`` count as accepted, the next one (if
        offered) as rejected, deeper ones are unobserved."""
        if not 0 <= depth_reached <= max_depth_offered:
            raise ValueError(
                f"depth_reached must be in 0..max_depth_offered, got {depth_reached} of {max_depth_offered}"
            )
        if max_depth_offered == 0:
            return  # a plain step says nothing about drafts
        self._observed += 1
        if self._probing:
            self._probing = False
            failed = depth_reached == 0
            self._probe_interval = (
                min(2 * self._probe_interval, self.max_probe_interval) if failed else self.probe_every
            )
        while len(self._successes) < max_depth_offered:
            self._successes.append(0.0)
            self._failures.append(0.0)
        for d in range(len(self._successes)):
            self._successes[d] *= self.forgetting
            self._failures[d] *= self.forgetting
        for d in range(depth_reached):
            self._successes[d] += 1.0
        if depth_reached < max_depth_offered:
            self._failures[depth_reached] += 1.0

    # -- estimates ------------------------------------------------------------------------------

    def acceptance(self, depth: int) -> float:
        """``a_depth``: the chance depth ``depth`` is kept given depth ``depth - 1`` was (posterior mean).

        The prior of depth 1 is the Beta prior; a deeper depth's prior mean is the estimate one level up
        (with the same weight): a depth rarely reached borrows from the one above it instead of staying
        at an optimistic 0.5, so a drafter that fails at depth 1 is not kept alive by unseen depths."""
        if depth < 1:
            raise ValueError(f"depths start at 1, got {depth}")
        return self._acceptances(depth)[-1]

    def _acceptances(self, depth: int) -> list[float]:
        """``[a_1, ..., a_depth]``, each built on the one above it (see :meth:`acceptance`)."""
        s0, f0 = self.prior
        weight, mean = s0 + f0, s0 / (s0 + f0)
        out = []
        for d in range(depth):
            if d < len(self._successes):
                s, f = self._successes[d], self._failures[d]
                mean = (weight * mean + s) / (weight + s + f)
            out.append(mean)
        return out

    def acceptance_by_depth(self) -> list[float]:
        """``[a_1, a_2, ...]`` for every depth offered so far."""
        return self._acceptances(len(self._successes))

    def expected_tokens(self, depth: int) -> float:
        """Tokens a round with a chain ``depth`` deep is expected to emit:
        ``1 + sum_{d=1..depth} prod_{j<=d} a_j`` (the bonus token counts 1)."""
        total, reach = 1.0, 1.0
        for a in self._acceptances(depth):
            reach *= a
            total += reach
        return total

    def round_cost(self) -> tuple[float, float]:
        """``(t0, per_token)`` of the fit ``seconds ~ t0 + per_token * tokens`` over the window.

        Least squares once rounds of at least two sizes are known, clamped to non-negative values.
        Before that (or with no spread), the prior shape ``per_token = t0 / 64`` scaled to the rounds
        seen; with no round at all, ``(1, 1/64)`` in arbitrary units (only ratios matter to :meth:`plan`).
        """
        if not self._rounds:
            return 1.0, 1.0 / 64
        xs = [x for x, _ in self._rounds]
        ys = [y for _, y in self._rounds]
        n = len(xs)
        mean_x, mean_y = sum(xs) / n, sum(ys) / n
        var_x = sum((x - mean_x) ** 2 for x in xs)
        if var_x == 0:
            t0 = sum(y / (1 + x / 64) for x, y in self._rounds) / n
            return t0, t0 / 64
        slope = sum((x - mean_x) * (y - mean_y) for x, y in self._rounds) / var_x
        if slope < 0:  # noise: a round cannot get cheaper by sending more
            return mean_y, 0.0
        t0 = mean_y - slope * mean_x
        if t0 < 0:  # refit through the origin
            return 0.0, sum(x * y for x, y in self._rounds) / sum(x * x for x in xs)
        return t0, slope

    def round_time(self, tokens: float) -> float:
        """Predicted seconds of a round that sends ``tokens`` tokens in all."""
        t0, per_token = self.round_cost()
        return t0 + per_token * tokens

    # -- decisions ------------------------------------------------------------------------------

    def plan(
        self,
        max_nodes: int,
        max_depth: int,
        batch_size: int = 1,
        nodes_for_depth: Callable[[int], int] | None = None,
    ) -> int:
        """Depth to draft next round (0: a plain step).

        Maximises ``batch_size * expected_tokens(D) / round_time(batch_size * (1 + nodes(D)))`` over
        ``D in 0..max_depth`` with ``nodes(D) <= max_nodes``; ``nodes`` is ``nodes_for_depth`` (the
        caller's tree shape) or a chain (``nodes(D) = D``). Drafting must beat plain by ``margin``;
        after ``probe_every`` plain answers in a row, one answer is a ``probe_depth`` probe; a probe
        that fails doubles that interval (up to 8x), one that is accepted restores it.
        """
        nodes = nodes_for_depth or (lambda depth: depth)

        def throughput(depth: int) -> float:
            seconds = self.round_time(batch_size * (1 + nodes(depth)))
            return batch_size * self.expected_tokens(depth) / max(seconds, 1e-12)

        # Before any evidence a tree is no deeper than a probe, and each round observed allows two levels
        # more: a good drafter reaches full depth in a few rounds, a bad one wastes little finding out.
        max_depth = min(max_depth, self.probe_depth + 2 * self._observed)
        depths = [d for d in range(1, max_depth + 1) if nodes(d) <= max_nodes]
        if not depths:
            self._last_depth = 0
            return 0
        best = max(depths, key=throughput)
        if throughput(best) > (1 + self.margin) * throughput(0):
            self._plain_streak = 0
            self._last_depth = best
            return best
        self._plain_streak += 1
        if self._plain_streak >= self._probe_interval:
            self._plain_streak = 0
            self._probing = True
            probes = [d for d in depths if d <= self.probe_depth]
            self._last_depth = max(probes) if probes else depths[0]
            return self._last_depth
        self._last_depth = 0
        return 0

    def predicted_tokens_per_round(self) -> float:
        """Tokens per round the measured acceptance predicts for the depth :meth:`plan` last answered."""
        return self.expected_tokens(self._last_depth)
