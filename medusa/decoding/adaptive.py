"""Load-adaptive speculation: which tree the next batched step should verify.

Speculation trades compute for tokens: a tree of N nodes costs a B x N-token forward and yields
E(tree) tokens per speculating row, where plain decoding costs a B-token forward and yields 1.
Decoding is memory-bound at small B, so trees are almost free there; at large B (or on a CPU)
the wide forward is compute-bound and plain decoding wins. Each step picks

    argmax over trees of  (S * E(tree) + (B - S)) / cost(B, N(tree))      [tokens / second]

where S of the B rows speculate. `choose_tree` is that pure function; `AcceptanceMeter` and
`StepCostModel` supply E and cost from measurements (or from `medusa bench --step-cost`).
Nothing here knows about models, tensors or requests."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from medusa.decoding.buckets import cost_bucket as batch_bucket


@dataclass(frozen=True)
class TreeOption:
    name: str
    nodes: int  # N, the root included (1 = plain decoding)
    expected_tokens: float  # E: tokens per speculating row per step (accepted + bonus, >= 1)


@dataclass(frozen=True)
class Choice:
    tree: str
    tokens_per_s: float  # expected, for the whole batch
    reason: str
    rates: dict  # tree name -> expected tokens/s (None: cost unknown)


def choose_tree(batch: int, speculating: int, options: list[TreeOption],
                cost: Callable[[int, int], float | None], margin: float = 0.0) -> Choice:
    """Pick the tree of highest expected throughput for a step over `batch` rows of which
    `speculating` may accept candidates. cost(B, N) -> seconds, or None when unknown: an option
    of unknown cost is explored first (smallest tree first), unless even at the cost of a measured
    smaller tree it could not beat the best measured option (step cost grows with the nodes), so
    no step is spent measuring a tree that cannot win. Ties go to the smaller tree.
    margin: a tree must beat plain decoding by this fraction (speculation has costs the step
    times miss: catching draft-head state up after plain steps, rows finishing out of step)."""
    if not options:
        raise ValueError("no tree to choose from")

    def gain_of(o: TreeOption) -> float:  # tokens the step yields for the whole batch
        return speculating * max(o.expected_tokens, 1.0) + (batch - speculating) if o.nodes > 1 else batch

    costs = {o.name: cost(batch, o.nodes) for o in options}
    rates = {o.name: None if costs[o.name] is None else gain_of(o) / max(costs[o.name], 1e-9) for o in options}
    known = [o for o in options if rates[o.name] is not None]
    best_known = max((rates[o.name] for o in known), default=0.0)
    for o in sorted((o for o in options if rates[o.name] is None), key=lambda o: o.nodes):
        # a step over more nodes costs at least what a measured step over fewer nodes costs, so
        # an unmeasured tree that could not beat the best measured one even at that cost is
        # not worth a (possibly expensive) exploring step
        floor = max((costs[k.name] for k in known if k.nodes <= o.nodes), default=None)
        if floor is not None and gain_of(o) / max(floor, 1e-9) <= best_known:
            continue
        return Choice(o.name, 0.0, f"exploring: no step cost yet for batch {batch} x {o.nodes} nodes", rates)
    plain = next((rates[o.name] for o in options if o.nodes == 1), None)

    def score(o: TreeOption) -> float:
        r = rates[o.name]
        return r / (1.0 + margin) if o.nodes > 1 and plain is not None else r

    best = max(known, key=lambda o: (score(o), -o.nodes))  # known: else the smallest option was explored
    vs = f", {rates[best.name] / plain:.2f}x plain" if plain and best.nodes > 1 else ""
    reason = (f"batch {batch} ({speculating} speculating): {best.name} expects {best.expected_tokens:.2f} tokens/row-step"
              f" at {batch}x{best.nodes} tokens/step -> {rates[best.name]:.0f} tokens/s{vs}")
    return Choice(best.name, rates[best.name], reason, rates)


class AcceptanceMeter:
    """Measured tokens per row-step for each tree (a running mean for the first `warmup` rows, an
    exponential average after; one row-step's count is noisy, about +-1.2 tokens, and trees
    differ by a few tenths: alpha 0.01 keeps the estimate within about 0.1 while a batch of 64
    still moves it in a few steps). A tree not yet measured is estimated from its prior expectation,
    scaled by how the measured trees compare with theirs (untrained heads accept less than the
    prior says, and every tree learns that from whichever ran)."""

    def __init__(self, priors: dict[str, float], alpha: float = 0.01, warmup: int = 100, explore: int = 32):
        self.priors = dict(priors)  # tree name -> prior E (>= 1)
        self.alpha, self.warmup, self.explore = alpha, warmup, explore
        self.mean: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def record(self, tree: str, tokens_per_row: list[int]) -> None:
        for x in tokens_per_row:
            n = self.count.get(tree, 0) + 1
            m = self.mean.get(tree, float(x))
            a = 1.0 / n if n <= self.warmup else self.alpha
            self.mean[tree] = m + a * (x - m)
            self.count[tree] = n

    def optimistic(self, tree: str) -> float:
        """What the policy assumes: the measurement once `explore` rows were seen (32: the mean of
        8 rows is off by about 0.4 tokens, enough to rule a good tree out for good), else the
        larger of the prior and the measurement so far. A tree that might be better than measured ones
        gets tried (a few rows) instead of being ruled out by how other trees did."""
        if self.count.get(tree, 0) >= self.explore:
            return self.mean[tree]
        return max(self.priors.get(tree, 1.0), self.mean.get(tree, 1.0))

    def expected(self, tree: str) -> float:
        if tree in self.mean:
            return self.mean[tree]
        prior = self.priors.get(tree, 1.0)
        ratios = [(self.mean[t] - 1) / (self.priors[t] - 1) for t in self.mean if self.priors.get(t, 1.0) > 1.0]
        scale = sum(ratios) / len(ratios) if ratios else 1.0
        return 1.0 + max(scale, 0.0) * (prior - 1.0)


class StepCostModel:
    """Seconds per step of B rows x N nodes (the engine records a step's whole cost to its
    scheduler: the step, then recording and emitting what it accepted). A given table
    {(batch, nodes): seconds} (from `medusa bench --step-cost`, whose rows are batch-1 forwards
    over N query tokens) is read as a function of the tokens per forward, B x N, interpolated
    linearly (proportional past the largest measured forward): a wide tree at batch 1 costs what
    many rows of one token cost.
    The engine's own step times (per batch bucket and N) take over once measured. Without
    either, a combination is estimated linearly over N from two trees measured at the same
    batch size, else None (the policy then measures it)."""

    def __init__(self, table: dict | None = None, alpha: float = 0.1):
        by_tokens: dict[int, list[float]] = {}
        for (b, n), s in (table or {}).items():
            by_tokens.setdefault(int(b) * int(n), []).append(float(s))
        self.table = sorted((t, sum(v) / len(v)) for t, v in by_tokens.items())  # [(tokens, seconds)]
        self.alpha = alpha
        self.online: dict[tuple[int, int], float] = {}
        self.count: dict[tuple[int, int], int] = {}
        self.seeded: dict[tuple[int, int], float] = {}

    def record(self, batch: int, nodes: int, seconds: float) -> None:
        """A measured step. The first sample of a key is replaced by the second (warm-up), then a
        running mean up to 5 samples, then an exponential average."""
        key = (batch_bucket(batch), nodes)
        n = self.count.get(key, 0) + 1
        self.count[key] = n
        old = self.online.get(key, seconds)
        a = 1.0 if n <= 2 else (1.0 / (n - 1) if n <= 6 else self.alpha)
        self.online[key] = old + a * (seconds - old)

    def seed(self, batch: int, nodes: int, seconds: float) -> None:
        """A step time measured ahead of traffic (Engine.warmup, on idle rows at a short context).
        Until real steps of that kind are timed, it is used scaled by how the real steps timed at
        the same batch size compare with their seeds (contexts grow; every tree's step grows
        with them), so a tree left unused does not keep looking as cheap as it was at warm-up."""
        self.seeded[(batch_bucket(batch), nodes)] = seconds

    def __call__(self, batch: int, nodes: int) -> float | None:
        bucket = batch_bucket(batch)
        key = (bucket, nodes)
        got = self.online.get(key)
        if got is not None and (self.count[key] >= 2 or key not in self.seeded):
            return got
        if key in self.seeded:
            ratios = [self.online[k] / s for k, s in self.seeded.items()
                      if k[0] == bucket and self.count.get(k, 0) >= 2 and s > 0]
            return self.seeded[key] * (sum(ratios) / len(ratios) if ratios else 1.0)
        got = _interpolate(self.table, batch * nodes)
        if got is not None:
            return got
        # two trees measured at this batch size: cost grows about linearly with the nodes
        pts = sorted((n, s) for (b, n), s in self.online.items() if b == bucket)
        if len(pts) < 2:
            return None
        below = [p for p in pts if p[0] < nodes]
        above = [p for p in pts if p[0] > nodes]
        if below and above:
            (n0, s0), (n1, s1) = below[-1], above[0]
        elif below:
            (n0, s0), (n1, s1) = below[-2], below[-1]
        else:
            (n0, s0), (n1, s1) = above[0], above[1]
        est = s0 + (s1 - s0) * (nodes - n0) / (n1 - n0)
        return max(est, 0.5 * min(s0, s1))  # noise must not make a tree look free


def _interpolate(points: list[tuple[int, float]] | None, x: int) -> float | None:
    """Piecewise-linear over sorted (x, y); flat below the first point, proportional above the last."""
    if not points:
        return None
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    xl, yl = points[-1]
    return yl * x / xl
