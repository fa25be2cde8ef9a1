"""The engine's speculation policy: which tree (or plain decoding) the next step uses, for the
whole batch, and what each step teaches it.

The pure chooser is adaptive.choose_tree (expected tokens per second from measured step costs
and acceptance); this module adds what makes it an engine's decision: the rows' switches
("on" forces the default tree, all "off" plain), the memo that keeps a choice a few steps,
the refresh rules that re-measure acceptance and plain cost now and then, the context end,
and the bookkeeping after a step (acceptance of the tree and of the smaller trees inside it,
lookup chains measured in the shadow of the steps that ran without them, step costs).

Knows trees, row counts and token lists; nothing of tensors, requests' sampling or threads."""
from __future__ import annotations

import collections

from medusa.decoding.adaptive import AcceptanceMeter, Choice, StepCostModel, TreeOption, batch_bucket, choose_tree
from medusa.decoding.dynamic_tree import is_dynamic
from medusa.decoding.tree import (Tree, accepted_within, build_tree, expected_accept_length, nodes_inside, prior_accuracies,
                                  search_tree)

SPEC_MARGIN = 0.1  # a tree must promise 10% more tokens/s than plain decoding (adaptive.choose_tree): under
# load speculation also costs what step times miss (catching Hydra++ up, rows finishing out of step and so
# more prefill forwards); a 25% margin did not fix concurrency 64 on an H100 and cost gains at 4 and 16
REFRESH_EVERY = 256  # plain steps after which the most promising tree runs once to re-measure acceptance
CHOICE_STEPS = 8
# tokens per step a lookup chain of 16 nodes is assumed to add until it is measured (shorter: in proportion):
# on an H100, all 80 MT-Bench prompts x 256 tokens, batch 1, the shipped Hydra++ tree accepted 2.75 per
# step alone and 4.05 with 16 lookup nodes (3.67 with 8). Optimistic on purpose: the AcceptanceMeter
# replaces it after `explore` rows, and a prior of the heads' paths alone kept the larger step from ever
# being tried at concurrency 1
LOOKUP_PRIOR_16 = 1.3
SHADOW_BATCH = 4  # up to this many rows, a step without a lookup chain still measures its twin with one (shadow)


def priors(trees: dict[str, Tree], heads) -> dict[str, float]:
    """Each tree's expected acceptance before any is measured: from the heads' own held-out
    accuracy table (heads.json "rank_accuracy", written by `medusa tree --heads`) when they
    ship one, else from a generic profile (tree.prior_accuracies)."""
    table = heads.config.extra.get("rank_accuracy") if heads is not None else None
    out = {}
    for n, t in trees.items():
        if is_dynamic(t):  # its static counterpart: the best fixed tree of as many nodes (a per-step tree does no worse)
            acc = table[:t.max_depth] if table else prior_accuracies(max(t.max_depth, 1), t.topk)
            t = build_tree(search_tree([row[:t.topk] for row in acc], t.head_nodes), t.name, t.lookup)
        ranks = 1 + max((r for p in t.paths for r in p), default=0)
        if table and len(table) >= t.max_depth:  # ranks past the table's count as never right
            acc = [[row[r] if r < len(row) else 0.0 for r in range(ranks)] for row in table]
        else:
            acc = prior_accuracies(max(t.max_depth, 1), max(10, ranks))
        out[n] = expected_accept_length(t.paths, acc) + LOOKUP_PRIOR_16 * min(t.lookup, 16) / 16
    return out


class Policy:
    def __init__(self, trees: dict[str, Tree], default_tree: Tree, heads, step_cost: dict | None, max_pos: int):
        self.trees, self.default_tree, self.max_pos = trees, default_tree, max_pos
        self.has_heads = heads is not None
        # the smaller trees each tree holds: a step over a tree measures their acceptance too, on the
        # same tokens (tree.accepted_within), so the policy compares trees on equal terms instead of
        # on whichever stretch of text each one happened to run
        self.inside = {big: [(n, inside) for n, t in trees.items()
                             if 1 < t.num_nodes < b.num_nodes and (inside := nodes_inside(b, t)) is not None]
                       for big, b in trees.items() if b.num_nodes > 2}
        # a lookup tree's heads' nodes alone -> the lookup tree (their steps measure it too: shadow)
        self.twin = {t.heads_only.name: t for t in trees.values() if t.lookup and t.heads_only.name in trees}
        self.meter = AcceptanceMeter(priors(trees, heads))
        self.cost = StepCostModel(step_cost)
        self.choice: dict = {}  # the last step's tree, batch, reason (and rates): Engine.stats()
        self.steps = 0
        self.tree_steps: collections.Counter = collections.Counter()  # tree -> steps run with it
        self.speculating = False  # the last step used a tree
        self._memo: tuple | None = None  # ((batch, auto rows), step, tree, reason, rates): see choose
        self._last_spec_step = 0
        self._plain_at: dict[int, int] = {}  # batch bucket -> last plain step (see choose)

    def choose(self, modes: list[str], kv_max: int) -> Tree:
        """The tree of the next step over rows with these speculation switches, the longest
        holding kv_max committed tokens (one tree per step for the whole batch)."""
        n = len(modes)
        rates = None
        if not self.has_heads:
            name, reason = "ar", "no draft heads"
        elif all(m == "off" for m in modes):
            name, reason = "ar", "every row has speculation off"
        elif "on" in modes:
            name, reason = self.default_tree.name, "a row asked for speculation on: the default tree"
        elif (self._memo is not None and self._memo[0] == (n, modes.count("auto"))
              and self.steps - self._memo[1] < CHOICE_STEPS):
            # a batch of the same size and switches keeps its choice a few steps: working it out
            # costs host time while the GPU waits (0.1 ms a step on an H200's host, 4% of a batch-1
            # Hydra++ step), and the measurements it rests on move slowly
            name, reason, rates = self._memo[2:]
        else:
            name, reason, rates = self._decide(n, modes.count("auto"))
        tree = self.trees[name]
        if tree.num_nodes > 1 and kv_max + tree.accept_depth >= self.max_pos:
            tree, reason = self.trees["ar"], "a row is at the end of the model's context: plain decoding"
        self.choice = {"tree": tree.name, "batch": n, "reason": reason, "step": self.steps}
        if rates is not None:
            self.choice["rates_tokens_per_s"] = rates
        return tree

    def _decide(self, n: int, auto: int) -> tuple[str, str, dict]:
        # acceptance does not depend on the batch: a tree not yet measured on `explore` rows is
        # expected to do what the heads' accuracy table says (AcceptanceMeter.optimistic), so a
        # promising tree gets tried; a large batch measures it in one step
        options = [TreeOption(t, tr.num_nodes, self.meter.optimistic(t)) for t, tr in self.trees.items()]
        c: Choice = choose_tree(n, auto, options, self.cost, SPEC_MARGIN)
        name, reason, rates = c.tree, c.reason, c.rates
        if name == "ar" and self.steps - self._last_spec_step >= REFRESH_EVERY:
            # acceptance is only measured while speculating: re-measure now and then (with the
            # tree closest to winning), or one bad stretch would keep the engine plain forever
            spec = [(r, t) for t, r in rates.items() if r is not None and self.trees[t].num_nodes > 1]
            name = max(spec)[1] if spec else self.default_tree.name
            reason = f"re-measuring acceptance with {name} ({REFRESH_EVERY} plain steps in a row)"
        elif name != "ar" and self.steps - self._plain_at.get(batch_bucket(n), -REFRESH_EVERY) >= REFRESH_EVERY:
            # the other way round: a step's cost grows with the contexts, and a warm-up seed of
            # plain decoding's cost, scaled by how the trees' own costs grew, can be far off
            name, reason = "ar", f"re-measuring plain decoding's step cost at batch {batch_bucket(n)}"
        rates = {k: (round(v, 1) if v is not None else None) for k, v in rates.items()}
        # keep only a choice resting on measurements (not a step that explores a cost or an
        # acceptance, or re-measures)
        settled = (c.tokens_per_s > 0 and name == c.tree
                   and (self.trees[name].num_nodes == 1 or self.meter.count.get(name, 0) >= self.meter.explore))
        self._memo = ((n, auto), self.steps, name, reason, rates) if settled else None
        return name, reason, rates

    def without_lookup(self, tree: Tree) -> Tree:
        """A step with a sampled row runs a lookup tree's heads' nodes alone (sampling stays
        exact only while siblings carry distinct tokens)."""
        tree = self.trees[tree.heads_only.name]
        self.choice["tree"] = tree.name
        self.choice["reason"] += "; a sampled row: without the lookup chain"
        return tree

    def shadowed(self, tree: Tree, n: int, sampled: bool) -> Tree | None:
        """The lookup tree a step over `tree` (its heads' nodes alone) measures in its shadow."""
        return self.twin.get(tree.name) if n <= SHADOW_BATCH and not sampled else None

    def ran(self, tree: Tree, n: int, rows: list[list[int]], off: list[bool], subtrees: bool) -> None:
        """After a step over n rows: rows[i] = [accepted, D + 1 tokens, D + 1 path node ids].
        subtrees: also measure the smaller trees inside `tree` on the same tokens (not with a
        typical-acceptance row: what a smaller tree would accept is not known exactly then)."""
        N, D = tree.num_nodes, tree.accept_depth
        self.speculating = N > 1
        if N > 1:
            self._last_spec_step = self.steps
        else:
            self._plain_at[batch_bucket(n)] = self.steps
        self.steps += 1
        self.tree_steps[tree.name] += 1
        if N > 1:
            spec = [row for row, o in zip(rows, off) if not o]
            self.meter.record(tree.name, [row[0] + 1 for row in spec])
            if subtrees:
                for sub, inside in self.inside.get(tree.name, ()):
                    self.meter.record(sub, [1 + accepted_within(row[D + 3: D + 3 + row[0]], inside) for row in spec])

    def shadow(self, pending: list, out: list[int], twin: str) -> None:
        """Measure the lookup tree `twin` on steps that ran its heads' nodes alone: once the tokens a
        step's chain guessed are known, the chain would have accepted its guesses up to the first
        wrong one, and the twin's step the longer of that and what the heads accepted. Exact for
        greedy rows (their tokens do not depend on the tree); steps near a request's end, whose
        guesses are never all known, are dropped. Without this, a lookup tree that measured low on
        one stretch of text would never run, and so never be measured, again; with it, both trees
        are compared on the same tokens. pending: (output index, draft, heads' accepted) of a
        row's steps, consumed as their guesses become known in `out`."""
        done = []
        while pending and pending[0][0] + len(pending[0][1]) <= len(out):
            at, draft, heads = pending.pop(0)
            m = 0
            while m < len(draft) and at + m < len(out) and draft[m] == out[at + m]:
                m += 1
            done.append(1 + max(m, heads))
        if done:
            self.meter.record(twin, done)
