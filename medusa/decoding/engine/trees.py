"""The trees an engine may step with: plain decoding ("ar") always, the default tree (a request
with speculation "on" gets it), the named static trees the heads are deep enough for, or a
dynamic tree's smaller node budgets (the policy shrinks it under load), and a lookup tree's
heads' nodes alone (a step with a sampled row takes them). The checks that keep them
consistent with the heads and with each other live here too."""
from __future__ import annotations

from medusa.decoding.dynamic_tree import DynamicTree, is_dynamic, smaller_budgets
from medusa.decoding.tree import DEFAULT_TREE, NAMED_TREES, Tree, load_tree
from medusa.errors import TreeError


def engine_trees(heads, tree: Tree | DynamicTree | str | None, trees: dict | None, device) -> tuple[dict[str, Tree], Tree]:
    """The trees a step may use ("ar" always) and the default one (speculation="on")."""
    ar = load_tree("ar")
    if heads is None:
        return {"ar": ar.to(device)}, ar.to(device)
    depth = heads.config.num_heads
    base = tree if isinstance(tree, (Tree, DynamicTree)) else load_tree(tree or DEFAULT_TREE)
    if trees is None and is_dynamic(base):  # under load the policy shrinks a dynamic tree's node budget
        trees = {t.name: t for t in smaller_budgets(base)}
    elif trees is None:
        named = (load_tree(n) for n in NAMED_TREES if n != "ar")
        trees = {t.name: t for t in named if t.max_depth <= depth}
    out = {"ar": ar, **dict(trees), base.name: base}
    for t in list(out.values()):  # a step with a sampled row takes a lookup tree's heads' nodes alone
        if t.lookup:
            out.setdefault(t.heads_only.name, t.heads_only)
    out = {n: t.bind(depth) if is_dynamic(t) else t for n, t in out.items()}  # grown as deep as the heads guess
    if any(is_dynamic(t) for t in out.values()) and not heads.grows_trees:
        raise TreeError(f"{heads.config.head_type} heads cannot grow dynamic trees")
    for t in out.values():
        if t.max_depth > depth:
            raise TreeError(f"tree {t.name} is {t.max_depth} deep but the heads guess only {depth} tokens ahead")
    both = ({t.num_nodes for t in out.values() if is_dynamic(t)}
            & {t.num_nodes for t in out.values() if not is_dynamic(t) and t.num_nodes > 1})
    if both:  # the policy keys step costs by node count, and a dynamic step costs more than a static one
        raise TreeError(f"a dynamic and a static tree of {min(both)} nodes in one engine: their step costs differ "
                        "but would be measured as one")
    out = {n: t.to(device) for n, t in out.items()}  # tree buffers live on the model's device
    return out, out[base.name]
