"""Accepted tokens per step of static trees against per-step (dynamic) trees, offline.

For each prompt, the base model's plain greedy continuation is decoded once; then, at every
position t of it (t = the last committed token, as a decode step sees it), the heads' drafts
are scored against the true continuation under teacher forcing:

- static: a fixed tree of top-k index paths (the heads' shipped tree); a step accepts the
  longest root path of the tree whose ranks match the true tokens' ranks in the heads' top-k.
- dynamic: the tree is grown per step from the heads' own probabilities. Depth by depth, the
  `--width` most probable nodes of the depth (probability = product of the head
  probabilities along the node's path) are expanded by their head's top `--topk`; the tree
  is then the `nodes - 1` most probable nodes of everything proposed (a node is never less
  probable than its parent, so the set holds the ancestors of its nodes).

Greedy acceptance is a property of the heads and the base model, not of the device, so this
runs on the CPU; it is an estimate of `mean_accepted` averaged over every position (a decode
loop visits only the positions its steps land on).

    python scripts/tree_acceptance.py --limit 40 --max-new-tokens 128 --nodes 16,32,64 --width 8
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medusa.bench.data import resolve_dataset  # noqa: E402
from medusa.bench.env import environment  # noqa: E402
from medusa.commands.common import Prompt, read_prompts  # noqa: E402
from medusa.decoding.generate import generate  # noqa: E402
from medusa.decoding.lookup import NgramLookup  # noqa: E402
from medusa.decoding.tree import counted_accept_length, load_tree, path_counts, search_tree  # noqa: E402
from medusa.runtime import load_stack  # noqa: E402
from medusa.training.accuracy import true_rank  # noqa: E402
from medusa.training.data import is_heldout, mix_prompts, read_prompt_file, sampled_mode  # noqa: E402
from medusa.training.features import base_hidden  # noqa: E402


def greedy(model, ids: list[int], n: int, eos) -> list[int]:
    out: list[int] = []
    for chunk in generate(model, ids, heads=None, max_new_tokens=n, stop_token_ids=eos):
        out.extend(chunk.tokens)
    return out


def head_logprobs(heads, base, d: int, s: torch.Tensor, chain: torch.Tensor, k: int):
    """Head d at summaries s [M, D] with path tokens chain [M, d+1] -> (logp [M, k], ids [M, k])."""
    z = heads.head_hidden(d, s, base.embed_tokens(chain))
    logp = torch.log_softmax(heads._draft_logits(d, z, base).float(), dim=-1)
    val, col = logp.topk(k, dim=-1)
    ids = col if heads.draft_vocab is None else heads.draft_vocab[col]
    return val, ids


@torch.no_grad()
def static_ranks(heads, base, s: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor, topk: int) -> torch.Tensor:
    """[M, K] rank of the true token in head d's top-k along the true path (topk when absent)."""
    K = heads.config.num_heads
    ranks = []
    for d in range(K):
        chain = seq[pos[:, None] + 1 + torch.arange(d + 1)]  # tokens t+1 .. t+1+d
        _, ids = head_logprobs(heads, base, d, s[pos], chain, topk)
        ranks.append(true_rank(ids, seq[pos + 2 + d]))
    return torch.stack(ranks, 1)


@torch.no_grad()
def grow(heads, base, s, seq, pos, widths: list[int], topk: int):
    """Grow per-step trees depth by depth: the widths[d] most probable proposals of depth d+1
    are expanded by head d+1 (widths[0]: the root's children kept for expansion).
    Returns per depth (score [M, C], token [M, C], parent [M, C] index into the previous depth's
    proposals, kept [M, C] bool: among the depth's widths[d] most probable)."""
    K = heads.config.num_heads
    M = pos.shape[0]
    chains = seq[pos + 1][:, None, None]  # [M, W, d+1] path tokens of the frontier (first: the root)
    fscore = torch.zeros(M, 1)
    fidx = torch.zeros(M, 1, dtype=torch.long)  # frontier nodes' indices into the previous depth's proposals
    pool = []
    for d in range(K):
        W = chains.shape[1]
        logp, ids = head_logprobs(heads, base, d, s[pos][:, None].expand(M, W, -1).reshape(M * W, -1),
                                  chains.reshape(M * W, -1), topk)
        score = (fscore[:, :, None] + logp.view(M, W, topk)).reshape(M, W * topk)
        tokens = ids.view(M, W * topk)
        parent = fidx[:, :, None].expand(M, W, topk).reshape(M, W * topk)
        keep = score.topk(min(widths[d], W * topk), dim=-1).indices  # [M, W']
        kept = torch.zeros_like(score, dtype=torch.bool).scatter_(1, keep, True)
        pool.append((score, tokens, parent, kept))
        fscore = score.gather(1, keep)
        chains = torch.cat([chains.gather(1, (keep // topk)[:, :, None].expand(-1, -1, chains.shape[2])),
                            tokens.gather(1, keep)[..., None]], 2)
        fidx = keep
    return pool


def walk(pool, chosen: list[torch.Tensor], seq, pos) -> torch.Tensor:
    """[M] accepted candidates: the true path through the chosen nodes (chosen[d] [M, C] bool)."""
    M = pos.shape[0]
    alive = torch.ones(M, dtype=torch.bool)
    at = torch.zeros(M, dtype=torch.long)  # the matched node's index among its depth's proposals
    acc = torch.zeros(M, dtype=torch.long)
    for d, ((score, tokens, parent, _), sel) in enumerate(zip(pool, chosen)):
        match = sel & (parent == at[:, None]) & (tokens == seq[pos + 2 + d][:, None])
        alive = alive & match.any(-1)
        at = torch.where(alive, match.float().argmax(-1), at)
        acc += alive.long()
    return acc


def global_choice(pool, n: int) -> list[torch.Tensor]:
    """The n - 1 most probable proposals of all depths (depth breaks ties: a child is never
    more probable than its parent, so the choice holds every chosen node's ancestors)."""
    sizes = [p[0].shape[1] for p in pool]
    scores = torch.cat([p[0] - 1e-6 * d for d, p in enumerate(pool)], 1)
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    chosen.scatter_(1, scores.topk(min(n - 1, scores.shape[1]), dim=-1).indices, True)
    return list(torch.split(chosen, sizes, 1))


def per_position_static(ranks: torch.Tensor, paths) -> torch.Tensor:
    """[M] heads' tokens accepted at each position by a static tree (its prefix-closed paths)."""
    have = {tuple(p) for p in paths}
    out = []
    for r in ranks.tolist():
        a = 0
        while a < len(r) and tuple(r[:a + 1]) in have:
            a += 1
        out.append(a)
    return torch.tensor(out)


def loop_steps(acc: list[int]) -> tuple[int, int]:
    """(tokens, steps) of a decode loop over these positions: a step at position i accepts acc[i]
    candidates and emits acc[i] + 1 tokens, so the next step starts acc[i] + 1 positions on."""
    i = steps = 0
    while i < len(acc):
        i += acc[i] + 1
        steps += 1
    return i, steps


def depth_profile(paths) -> list[int]:
    """Nodes per depth of a static tree."""
    K = max(len(p) for p in paths)
    return [sum(1 for p in paths if len(p) == d + 1) for d in range(K)]


MIX = ("sharegpt_first_turns.jsonl", "code_alpaca_2k.json", "gsm8k_train.jsonl", "alpaca_en_demo.json")


PROMPTS_DIR = Path(__file__).resolve().parent / "data" / "prompts"  # the training pipeline's default prompts


def heldout_prompts(spec: str, limit: int | None, folder: Path = PROMPTS_DIR) -> list[Prompt]:
    """`heldout` or `heldout:<file stem>`: prompts of the distillation mix in `folder`
    (scripts/train_default_heads.sh, in the order of its seed 0) whose records every training run
    held out (medusa train's --heldout 0.02, distill's --sample-fraction 0.3), so the heads never
    trained on them. The shipped heads' held-out set is the one of the full prompt files (see
    scripts/data/prompts/SOURCES.md); the samples in the repository give a smaller one."""
    only = spec.partition(":")[2]
    files = []
    for name in MIX:
        if not (folder / name).is_file():
            raise SystemExit(f"tree_acceptance: {name} not found in {folder} (--prompts-dir)")
        files.append(read_prompt_file(folder / name))
    out = [Prompt(p.id, p.text) for p in mix_prompts(files, seed=0)
           if is_heldout(f"{p.id}:{sampled_mode(p.id, 0.3)}", 0.02) and (not only or p.id.split(":")[0] == only)]
    return out[:limit]


def select_prompts(dataset: str, limit: int | None, folder: Path = PROMPTS_DIR) -> list[Prompt]:
    """--dataset: held-out prompts of the mix, MT-Bench or a JSONL file."""
    if dataset.startswith("heldout"):
        return heldout_prompts(dataset, limit, folder)
    return read_prompts(resolve_dataset(dataset)[1], limit)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mt_bench",
                    help="mt_bench, a JSONL prompt file, or heldout[:<file stem>]: the distillation mix's held-out prompts")
    ap.add_argument("--prompts-dir", type=Path, default=PROMPTS_DIR,
                    help="folder of the distillation mix's prompt files, for --dataset heldout (default: scripts/data/prompts)")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--heads", default="hydra")
    ap.add_argument("--nodes", default="16,32,64")
    ap.add_argument("--width", type=int, default=8, help="nodes expanded per depth (dynamic trees)")
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--trees", nargs="*", default=[], metavar="FILE", help="more static trees to score (tree JSON files)")
    ap.add_argument("--depthwise", default="64", help="node budgets of per-step trees with the static tree's nodes per depth")
    ap.add_argument("--lookup", default="", help="prompt-lookup chain lengths to add as one more branch of the shipped tree, e.g. 4,8")
    ap.add_argument("--lookup-ngram", default="3:1", help="max:min n-gram sizes matched by the lookup")
    ap.add_argument("--outputs", metavar="FILE", help="cache of the greedy continuations (JSON; read if present, else written)")
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--dump-prompts", metavar="FILE",
                    help="write the selected prompts as JSONL ({id, prompt}: what `medusa bench --dataset FILE` reads) and stop")
    args = ap.parse_args()
    if args.dump_prompts:
        prompts = select_prompts(args.dataset, args.limit, args.prompts_dir)
        Path(args.dump_prompts).write_text("".join(json.dumps({"id": p.id, "prompt": p.text}) + "\n" for p in prompts))
        print(f"wrote {len(prompts)} prompts to {args.dump_prompts}")
        return 0
    nodes = [int(x) for x in args.nodes.split(",") if x]
    torch.set_grad_enabled(False)
    stack = load_stack(heads=args.heads, device="cpu", dtype="float32")
    env = environment(torch.device("cpu"))
    model, heads, tok = stack.model, stack.heads, stack.tokenizer
    K = heads.config.num_heads
    rank_acc = heads.config.extra.get("rank_accuracy")
    static = {f"static{n}": search_tree(rank_acc, n) for n in nodes} if rank_acc else {}
    if heads.config.tree:
        static["shipped"] = [tuple(p) for p in heads.config.tree]
    for f in args.trees:
        t = load_tree(f)
        static[f"{Path(f).parent.name}/{t.name}"] = list(t.paths)
    prompts = select_prompts(args.dataset, args.limit, args.prompts_dir)
    eos = tuple(sorted(set(model.cfg.eos_token_ids) | set(tok.eos_token_ids)))
    depthwise = [int(x) for x in args.depthwise.split(",") if x]
    per_depth = {f"depthwise{n}": depth_profile(static[f"static{n}"]) for n in depthwise if f"static{n}" in static}
    per_depth = {k: w + [0] * (K - len(w)) for k, w in per_depth.items()}
    sums = {f"dynamic{n}": 0 for n in nodes} | {name: 0 for name in per_depth}
    counts: dict = {}  # static trees: the positions' rank paths (tree.path_counts), over all prompts
    lookups = [int(x) for x in args.lookup.split(",") if x]
    max_n, min_n = (int(x) for x in args.lookup_ngram.split(":"))
    combos = {k: v for k, v in static.items() if not k.startswith("static")}  # the shipped tree and --trees
    lsums = {f"lookup{L}": 0 for L in lookups} | {f"{k}+lookup{L}": 0 for k in combos for L in lookups}
    lhits = {L: 0 for L in lookups}
    loop = {k: [0, 0] for k in [*combos, *lsums]} if lookups else {}  # name -> [tokens, steps] of a simulated decode loop
    count = 0
    cached = json.loads(Path(args.outputs).read_text()) if args.outputs and Path(args.outputs).is_file() else {}
    key = f"{args.max_new_tokens}"
    for p in tqdm(prompts, desc="prompts", unit="prompt"):
        ids = tok.encode_prompt(p.text, chat=True)
        out = cached.get(key, {}).get(p.id)
        if out is None:
            out = cached.setdefault(key, {})[p.id] = greedy(model, ids, args.max_new_tokens, eos)
            if args.outputs:
                Path(args.outputs).write_text(json.dumps(cached))
        seq = torch.tensor(ids + out)
        T = seq.shape[0]
        pos = torch.arange(len(ids) - 1, T - 2 - K + 1)  # steps whose whole path is known
        if pos.numel() == 0:
            continue
        hidden = base_hidden(model, seq[None])
        s = heads.summary(hidden, model)[0]  # [T, D]
        ranks = static_ranks(heads, model, s, seq, pos, args.topk)
        for path, n in path_counts(ranks, args.topk).items():
            counts[path] = counts.get(path, 0) + n
        if lookups:
            tree_acc = {k: per_position_static(ranks, paths).tolist() for k, paths in combos.items()}
            per = {k: list(v) for k, v in tree_acc.items()} | {k: [] for k in lsums}
            toks = seq.tolist()
            first = int(pos[0])
            look = NgramLookup(toks[:first + 1], max_n, min_n)  # the engine's index, grown a token per position
            for i, t in enumerate(pos.tolist()):
                look.extend(toks[t + 1:t + 2])  # committed tokens and the root (the step's known next token)
                for L in lookups:
                    chain = look.propose(L)
                    a = 0
                    while a < len(chain) and t + 2 + a < T and chain[a] == toks[t + 2 + a]:
                        a += 1
                    lhits[L] += bool(chain)
                    lsums[f"lookup{L}"] += a
                    per[f"lookup{L}"].append(a)
                    for k, acc in tree_acc.items():
                        lsums[f"{k}+lookup{L}"] += max(a, acc[i])
                        per[f"{k}+lookup{L}"].append(max(a, acc[i]))
            for k, acc in per.items():
                n_tok, n_steps = loop_steps(acc)
                loop[k][0] += n_tok
                loop[k][1] += n_steps
        pool = grow(heads, model, s, seq, pos, [args.width] * K, args.topk) if nodes else []
        for n in nodes:
            sums[f"dynamic{n}"] += int(walk(pool, global_choice(pool, n), seq, pos).sum())
        for name, widths in per_depth.items():  # fixed nodes per depth, the most probable of each depth
            pool = grow(heads, model, s, seq, pos, widths, args.topk)
            sums[name] += int(walk(pool, [p[3] for p in pool], seq, pos).sum())
        count += pos.numel()
    res = {**env, "dataset": args.dataset, "heads": stack.heads_name, "dtype": "float32",
           "max_new_tokens": args.max_new_tokens, "positions": count, "prompts": len(prompts), "width": args.width, "topk": args.topk,
           "accepted_per_step": {**{k: round(counted_accept_length(p, counts, count), 4) for k, p in static.items()},
                                 **{k: round(1 + v / count, 4) for k, v in sums.items()},
                                 **{k: round(1 + v / count, 4) for k, v in lsums.items()}},
           **({"lookup": {"ngram": args.lookup_ngram, "found_share": {L: round(h / count, 4) for L, h in lhits.items()}},
               # every position weighs the same above; a decode loop visits only the positions its steps
               # land on, and a lookup chain's acceptance varies far more from place to place than the
               # heads' (long in repeated text, nothing elsewhere): tokens per step of the simulated loop
               "loop_tokens_per_step": {k: round(t / max(n, 1), 4) for k, (t, n) in loop.items()}} if lookups else {})}
    print(json.dumps(res, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
