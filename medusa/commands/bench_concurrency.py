"""`medusa bench --concurrency`: the batched engine's throughput by concurrent request count
and mode (medusa.bench.concurrency measures), on one device or on --tp ranks."""
from __future__ import annotations

import sys
from pathlib import Path

from medusa.commands.bench_common import at_least, device_of, int_list, publish, slug
from medusa.commands.common import read_prompts
from medusa.commands.tp import run_ranks
from medusa.errors import RequestError


def run_concurrency(args) -> int:
    try:
        import medusa.decoding.engine  # noqa: F401
    except ImportError:
        raise RequestError("--concurrency is not available until the batched engine (medusa.decoding.engine) lands") from None
    import json

    from medusa.bench import concurrency as cc
    from medusa.bench.data import resolve_dataset

    levels = int_list(args.concurrency, "--concurrency")
    modes = cc.parse_modes(args.modes or "ar,spec")
    at_least("--max-new-tokens", args.max_new_tokens, 1)
    at_least("--requests", args.requests, 1)
    at_least("--repeats", args.repeats, 1)
    table = None
    if args.step_cost_table:
        try:
            table = json.loads(Path(args.step_cost_table).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RequestError(f"cannot read --step-cost-table {args.step_cost_table}: {e}") from None
    label, path = resolve_dataset(args.dataset)
    prompts = read_prompts(path, args.limit)
    if args.tp is not None:
        return run_ranks(args, _concurrency, label, prompts, levels, modes, table)
    return _concurrency(args, label, prompts, levels, modes, table)


def _concurrency(args, label: str, prompts, levels: list[int], modes: list[str], table, group=None) -> int | None:
    """Load, measure and publish; group: this rank of --tp (rank 0 measures, the others replay
    its engines' steps and return None)."""
    from medusa.runtime import load_stack

    if group is None:
        dev = device_of(args)
    else:
        from medusa.parallel.replica import replica

        dev = group.device
    stack = load_stack(args.model, heads="none" if modes == ["ar"] else "default", tree=args.tree,
                       dtype=args.dtype, device=str(dev), progress=group is None or group.rank == 0, group=group)
    if group is None:
        return _measure_concurrency(args, label, prompts, levels, modes, table, stack, dev)
    with replica(group, stack.model, stack.heads) as driving:
        return _measure_concurrency(args, label, prompts, levels, modes, table, stack, dev) if driving else None


def _measure_concurrency(args, label, prompts, levels, modes, table, stack, dev) -> int:
    from tqdm import tqdm

    from medusa.bench import concurrency as cc
    from medusa.bench.env import environment

    tok = stack.tokenizer
    eos = tuple(sorted(set(stack.model.cfg.eos_token_ids) | set(tok.eos_token_ids)))
    ids = [tok.encode_prompt(p.text, chat=not args.no_chat) for p in prompts]
    if stack.heads is None and modes != ["ar"]:
        raise RequestError("no draft heads available for the spec/auto modes")
    env = environment(dev)
    total = len(modes) * args.repeats * sum(args.requests or max(8, 2 * c) for c in levels)
    bar = tqdm(total=total, desc="concurrency", unit="req", file=sys.stderr)

    def preparing(done: int, total: int) -> None:  # each engine's warm-up (graph captures, step timing)
        bar.set_postfix_str(f"preparing engine {done}/{total}" if done < total else "", refresh=True)

    rows = cc.run_concurrency(stack.model, stack.heads, stack.tree, ids, levels, modes, args.max_new_tokens, eos,
                              requests=args.requests, step_cost=cc.step_cost_table(table, max(map(len, ids))),
                              on_done=bar.update, graphs=False if args.no_graphs else None, on_prepare=preparing,
                              repeats=args.repeats)
    bar.close()
    doc = {
        "kind": "concurrency", "dataset": label, **env, "model": stack.source.name,
        "dtype": str(stack.model.dtype).removeprefix("torch."), "max_new_tokens": args.max_new_tokens,
        "heads": stack.heads_name, "tree": stack.tree.name, "tree_nodes": stack.tree.num_nodes,
        "step_cost_table": Path(args.step_cost_table).name if args.step_cost_table else None, "rows": rows,
        "tensor_parallel": args.tp or 1,
    }
    return publish(doc, Path(args.out), slug(args.name or f"concurrency-{label}-{doc['device']}"), cc.concurrency_markdown)
