"""`medusa tree`: the tree that accepts the most tokens for each node budget, from measured
head accuracies (`medusa eval heads --json`), greedily adding the node with the largest gain.

Two searches: `counts` (default when the JSON has them) takes the positions' observed top-k
rank paths (`path_counts`: how often the heads' true tokens sat at ranks r_0, r_1, ... along
one path), so a node's gain is the share of positions passing through it; `independent` takes
the per-rank accuracy table and multiplies along a path as if the heads erred independently
(the Medusa paper's construction). Writes one tree JSON per budget and, with --heads, stores
the tree of --ship-nodes and the accuracy table in that heads folder's heads.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from medusa.commands.common import HelpFormatter
from medusa.errors import RequestError


def register(sub) -> None:
    p = sub.add_parser("tree", help="search the best tree per node budget from head accuracies",
                       formatter_class=HelpFormatter)
    p.add_argument("--accuracies", required=True, help="JSON from `medusa eval heads --json`")
    p.add_argument("--nodes", default="16,32,64,128", help="node budgets (root included), comma separated")
    p.add_argument("--out", required=True, help="folder for tree<N>.json files")
    p.add_argument("--heads", default=None, help="heads folder whose heads.json gets the tree of --ship-nodes")
    p.add_argument("--ship-nodes", type=int, default=64, help="node budget of the tree written into --heads")
    p.add_argument("--search", choices=("counts", "independent"), default=None,
                   help="counts: on the observed rank paths (default when the accuracies have them); independent: on the rank table")
    p.set_defaults(func=run)


def read_accuracies(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RequestError(f"cannot read accuracies {path}: {e}") from None
    return data if isinstance(data, dict) else {}


def read_rank_accuracies(path: str | Path, data: dict) -> list[list[float]]:
    """The "rank" table of `data` (read from `path`, named in errors)."""
    acc = data.get("rank")
    if not (isinstance(acc, list) and acc and all(isinstance(r, list) and r for r in acc)):
        raise RequestError(f'{path}: expected {{"rank": [[p(head i right at rank r)] ...]}} (medusa eval heads --json)')
    if any(not 0.0 <= float(a) <= 1.0 for r in acc for a in r):
        raise RequestError(f"{path}: accuracies must lie in [0, 1]")
    return [[float(a) for a in r] for r in acc]


def read_path_counts(path: str | Path, data: dict) -> tuple[dict[tuple[int, ...], int], int] | None:
    """(path -> positions, positions) from the JSON's "path_counts" and "tokens", or None."""
    raw = data.get("path_counts")
    if raw is None:
        return None
    try:
        counts = {tuple(int(r) for r in k.split(",")): int(n) for k, n in raw.items()}
        positions = int(data["tokens"])
    except (AttributeError, KeyError, TypeError, ValueError):
        raise RequestError(f'{path}: "path_counts" must map "r0,r1,..." to counts, beside "tokens"') from None
    if positions < 1 or any(n < 0 or n > positions or min(p, default=-1) < 0 for p, n in counts.items()):
        raise RequestError(f"{path}: path counts must be non-empty rank paths counted at most \"tokens\" times")
    return counts, positions


def run(args) -> int:
    from medusa.decoding.tree import build_tree
    from medusa.heads.base import HeadsConfig
    from medusa.training.accuracy import trees_for_budgets

    try:
        budgets = sorted({int(n) for n in args.nodes.split(",") if n.strip()})
    except ValueError:
        raise RequestError(f"--nodes takes comma-separated integers, got {args.nodes!r}") from None
    if not budgets or budgets[0] < 1:
        raise RequestError("--nodes: budgets must be >= 1")
    data = read_accuracies(args.accuracies)
    acc = read_rank_accuracies(args.accuracies, data)
    observed = read_path_counts(args.accuracies, data)
    if args.search == "counts" and observed is None:
        raise RequestError(f"--search counts: {args.accuracies} has no path_counts (written by `medusa eval heads --json`)")
    counts, positions = observed if observed is not None and args.search != "independent" else (None, 0)
    if args.heads and args.ship_nodes not in budgets:
        budgets = sorted(set(budgets) | {args.ship_nodes})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"search: {'on the observed rank paths of ' + str(positions) + ' positions' if counts else 'independent per-rank accuracies'}")
    print("nodes  depth  expected accepted length (independent)" + ("  accepted on the observed positions" if counts else ""))
    shipped = None
    for t in trees_for_budgets(acc, budgets, counts, positions):
        name = f"tree{t.nodes}"
        doc = {"name": name, "nodes": t.nodes, "expected_accept_length": round(t.expected_accept_length, 4)}
        if t.counted_accept_length is not None:
            doc["counted_accept_length"] = round(t.counted_accept_length, 4)
        (out / f"{name}.json").write_text(json.dumps({**doc, "paths": [list(p) for p in t.paths]}) + "\n")
        depth = max((len(p) for p in t.paths), default=0)
        print(f"{t.nodes:>5d}  {depth:>5d}  {t.expected_accept_length:.3f}"
              + (f"  {t.counted_accept_length:.3f}" if t.counted_accept_length is not None else ""))
        if args.heads and t.nodes <= args.ship_nodes:
            shipped = t
    if args.heads:
        cfg_path = Path(args.heads) / "heads.json"
        try:
            cfg = HeadsConfig.from_dict(json.loads(cfg_path.read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise RequestError(f"cannot read {cfg_path}: {e}") from None
        if max((len(p) for p in shipped.paths), default=0) > cfg.num_heads:
            raise RequestError(f"the accuracies describe deeper heads than the {cfg.num_heads} in {args.heads}")
        build_tree(shipped.paths)  # validate
        d = cfg.to_dict()
        d["tree"] = [list(p) for p in shipped.paths]
        d.setdefault("extra", {})["tree_expected_accept_length"] = round(shipped.expected_accept_length, 4)
        d["extra"].pop("tree_counted_accept_length", None)
        if shipped.counted_accept_length is not None:
            d["extra"]["tree_counted_accept_length"] = round(shipped.counted_accept_length, 4)
        # the table itself: the engine's adaptive policy expects each tree's acceptance from it
        d["extra"]["rank_accuracy"] = [[round(a, 6) for a in row] for row in acc]
        cfg_path.write_text(json.dumps(d, indent=1))
        print(f"tree: the {shipped.nodes}-node tree stored in {cfg_path}", file=sys.stderr)
    return 0
