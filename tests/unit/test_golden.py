"""The golden test: speculative greedy output equals plain greedy output, token for token.

1. The default heads on 10 MT-Bench prompts x 64 new tokens, for every shipped tree and for
   dynamic trees (grown per row and step from the heads' confidences).
2. Oracle heads that know the greedy continuation (rank 0 right, or only rank 1 right at some
   depths), so that long and non-first paths are accepted and the KV commit is exercised; for
   dynamic trees, oracle heads confident in the continuation at the chosen rank."""
import math

import pytest
import torch

from medusa.decoding.generate import Stats, generate
from medusa.decoding.tree import load_tree
from medusa.heads.base import DraftHeads

TREES = ["chain", "tree16", "tree32", "tree64", "tree16+lookup10",  # tree16+lookup10: with a prompt-lookup chain
         "dynamic16", "dynamic64@0.01", "dynamic16+lookup10"]  # trees grown per step from the heads' confidences
NEW = 64


def run(model, ids, heads=None, tree=None, n=NEW):
    st = Stats()
    out = [t for c in generate(model, ids, heads=heads, tree=tree, max_new_tokens=n, stats=st) for t in c.tokens]
    return out, st


@pytest.fixture(scope="module")
def ar_outputs(stack, mt_prompts):
    return [run(stack.model, ids)[0] for ids in mt_prompts]


@pytest.mark.parametrize("tree", TREES)
def test_spec_greedy_equals_ar_greedy(stack, mt_prompts, ar_outputs, tree):
    heads = stack.heads
    assert heads is not None
    for ids, ref in zip(mt_prompts, ar_outputs):
        out, st = run(stack.model, ids, heads, tree)
        assert out == ref
        assert st.steps <= len(out)


def test_heads_own_tree_equals_ar(stack, mt_prompts, ar_outputs):
    """The heads' searched tree (stored with them) and the stack's default tree (on a CPU, the
    shipped heads' smaller searched tree)."""
    from medusa.decoding.tree import build_tree

    trees = [stack.tree]
    if stack.heads.config.tree:
        trees.append(build_tree(stack.heads.config.tree, name="own"))
    for tree in trees:
        for ids, ref in zip(mt_prompts[:3], ar_outputs[:3]):
            assert run(stack.model, ids, stack.heads, tree)[0] == ref


class OracleHeads(DraftHeads):
    """Proposes the known greedy continuation at rank `right_rank[d]` of depth d, and a wrong
    token (the true one + 1) at every other rank."""

    def __init__(self, truth: list[int], prompt_len: int, right_rank: list[int]):
        super().__init__()
        self.truth, self.prompt_len, self.right_rank = truth, prompt_len, right_rank

    def propose(self, state, last_hidden, root, tree, base):
        committed = int(state)  # tokens of the output already in the cache
        cand = torch.empty(1, tree.num_nodes, dtype=torch.long)
        cand[0, 0] = root[0]
        for i in range(1, tree.num_nodes):
            d, r = int(tree.depth[i]), int(tree.rank[i])
            j = committed + d  # output index the node guesses
            true = self.truth[j] if j < len(self.truth) else 0
            cand[0, i] = true if r == self.right_rank[d - 1] else (true + 1) % base.cfg.vocab_size
        return cand

    def new_state(self, batch, max_len, base, lazy=False):
        return None  # no state: CountingOracle keeps one


class CountingOracle(OracleHeads):
    """Tracks how many output tokens are committed by watching what the base shows the heads
    (`see`): the state holds, per row, the output tokens in the cache (the last committed
    position + 1 - the prompt length; the prompt makes it 0, the root being output index 0).
    Never lazy: it sees every forward as it happens."""

    def new_state(self, batch, max_len, base, lazy=False):
        return torch.full((batch,), -1, dtype=torch.long)  # per-row, updated in place

    def see(self, state, seen):
        if seen.count is not None:  # a prompt: its last real token
            count = torch.as_tensor(seen.count, device=seen.positions.device).long().clamp_min(1)
            last = seen.positions.gather(1, (count - 1)[:, None])[:, 0]  # [B]
        else:  # a step: the last accepted node
            last = seen.positions.gather(1, seen.last_node[:, None])[:, 0]
        state.copy_(last + 1 - self.prompt_len)

    def propose(self, state, last_hidden, root, tree, base):
        return super().propose(state[0], last_hidden, root, tree, base)


def run_oracle(oracle, stack, ids, truth, right_rank, tree):
    """48 tokens of `ids` with oracle heads (the shipped heads' config) on `tree`: (tokens, Stats)."""
    heads = oracle(truth, len(ids), right_rank)
    heads.config = stack.heads.config
    return run(stack.model, ids, heads, tree, n=48)


@pytest.fixture(scope="module")
def truth(stack, mt_prompts):
    return run(stack.model, mt_prompts[0], n=48)[0]


@pytest.mark.parametrize("right_rank,tree", [([0, 0, 0, 0], "tree64"), ([0, 0, 0, 0], "chain"),
                                             ([1, 0, 1, 0], "tree64"), ([1, 1, 1, 1], "tree32")])
def test_oracle_heads_accept_long_paths_and_stay_exact(stack, mt_prompts, truth, right_rank, tree):
    out, st = run_oracle(CountingOracle, stack, mt_prompts[0], truth, right_rank, tree)
    assert out == truth
    t = load_tree(tree)
    reachable = all(any(p[:d + 1] == tuple(right_rank[:d + 1]) for p in t.paths) for d in range(t.max_depth))
    if reachable:  # every step accepts the full depth (+1 bonus) until the end
        assert st.mean_accepted > t.max_depth


class DynamicOracle(CountingOracle):
    """Grows dynamic trees: a node's children are the true next token at rank `right_rank[d]`
    and wrong ones elsewhere, with confidence 0.9 at rank 0 and the rest shared (the heads'
    confidence, whatever the node's path: the tree must find the true path among the others)."""

    def draft_children(self, state, last_hidden, level, chains, k, base):
        B, W, _ = chains.shape
        j = int(state[0]) + level + 1  # output index a child at depth level + 1 guesses
        true = self.truth[j] if j < len(self.truth) else 0
        shift = (torch.arange(k) - self.right_rank[level]) % k  # rank r holds true + shift[r]: true at right_rank
        tokens = (true + shift) % base.cfg.vocab_size
        logp = torch.full((k,), math.log(0.1 / (k - 1)))
        logp[0] = math.log(0.9)
        return tokens.expand(B, W, k), logp.expand(B, W, k)


@pytest.mark.parametrize("right_rank,tree", [([0, 0, 0, 0], "dynamic16"), ([1, 0, 1, 0], "dynamic64"),
                                             ([0, 0, 0, 0], "dynamic8+lookup4")])
def test_oracle_heads_grow_dynamic_trees_and_stay_exact(stack, mt_prompts, truth, right_rank, tree):
    out, st = run_oracle(DynamicOracle, stack, mt_prompts[0], truth, right_rank, tree)
    assert out == truth
    if right_rank == [0, 0, 0, 0]:  # the confident path is the true one: every step accepts the full depth
        assert st.mean_accepted > 4
