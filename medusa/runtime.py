"""Assemble what a caller decodes with: base model, tokenizer, draft heads and tree, from the
user's --model / --heads / --tree / --dtype choices. Shared by the CLI, the benchmarks and the
services so that every one of them loads things the same way."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from medusa.decoding.tree import DEFAULT_TREE, Tree, load_tree, own_tree, resolve_tree
from medusa.errors import HeadsMismatchError, ModelLoadError
from medusa.heads.io import load_heads, untrained_heads
from medusa.model.loading import ModelSource, load_model
from medusa.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# preference order for the default; medusa2 / hydra2 (Medusa-2: heads trained jointly with backbone
# adapters, merged into the model when they load) are selected by name where they ship
SHIPPED_HEADS = ("hydra", "medusa", "hydra2", "medusa2")
CPU_TREE = "tree16.json"  # the shipped heads' searched tree used by default on a CPU


def shipped_heads_dir(name: str) -> Path | None:
    """Folder of heads shipped in the package for the default model, if present."""
    p = Path(str(resources.files("medusa").joinpath("assets", "heads", name)))
    return p if (p / "heads.json").is_file() else None


def shipped_heads_dirs(spec: str) -> list[Path]:
    """The shipped heads folders `spec` names ("default": each shipped family, in preference
    order; "medusa" / "hydra": that one), those present in this installation."""
    names = SHIPPED_HEADS if spec == "default" else (spec,)
    return [d for d in map(shipped_heads_dir, names) if d is not None]


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}: {', '.join(DTYPES)} or auto")
    if device.type == "cpu" and name == "float16":
        raise ModelLoadError("float16 is not supported on CPU: use float32 or bfloat16")
    return DTYPES[name]


@dataclass
class Stack:
    model: torch.nn.Module
    tokenizer: Tokenizer
    source: ModelSource
    heads: torch.nn.Module | None
    heads_name: str
    tree: Tree


def resolve_heads(spec: str | None, model, source: ModelSource):
    """--heads: default | medusa | hydra | none | PATH. Returns (heads or None, label)."""
    spec = spec or "default"
    if spec == "none":
        return None, "none"
    if spec in ("default", *SHIPPED_HEADS):
        for d in shipped_heads_dirs(spec):
            try:
                return load_heads(d, model), d.name
            except HeadsMismatchError:
                if spec != "default" or source.gguf is None:
                    raise
        if spec != "default":
            raise HeadsMismatchError(f"no shipped {spec} heads in this installation")
        return untrained_heads(model), "untrained"
    return load_heads(spec, model), str(spec)


def tqdm_progress():
    """A loading.Progress callback drawing a tqdm bar on stderr (none when stderr is not a
    terminal, unless a TQDM_* variable says otherwise)."""
    import os

    from tqdm import tqdm

    # TQDM_DISABLE is read here, not left to tqdm: tqdm reads its TQDM_* defaults once, at import
    flag = os.environ.get("TQDM_DISABLE")
    quiet = {"disable": None if flag is None else flag.lower() in ("1", "true")}  # None: off on a non-TTY

    bar, doing = None, None

    def update(done: int, total: int, what: str) -> None:
        nonlocal bar, doing
        if bar is None or what != doing:  # a new phase (a GGUF's conversion, then the load): a new bar
            if bar is not None:
                bar.close()
            bar, doing = tqdm(total=total, desc=what, unit="tensor", leave=False, **quiet), what
        bar.n = done + 1
        bar.refresh()
        if done + 1 >= total:
            bar.close()

    return update


def load_stack(model: str | None = None, heads: str | None = "default", tree: str | None = None,
               dtype: str | None = None, device: str | None = None, progress: bool = True,
               quantization: str | None = None, group=None) -> Stack:
    """group (a medusa.parallel.comm.Group): this rank's shard of the model, on the group's
    device, with the heads replicated (every rank of the group calls this, in step)."""
    if group is not None:
        return _load_shard(model, heads, tree, dtype, quantization, group)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    m, src = load_model(model, dtype=parse_dtype(dtype, dev), device=dev, progress=tqdm_progress() if progress else None,
                        quantization=quantization)
    return _assemble(m, src, *resolve_heads(heads, m, src), tree)


def _load_shard(model, heads, tree, dtype, quantization, group) -> Stack:
    from medusa.parallel.load import full_view, load_sharded
    from medusa.parallel.replica import step_model

    if quantization is not None:
        raise ModelLoadError("quantized weights are not supported with tensor parallelism")
    m, src = load_sharded(model, group, dtype=parse_dtype(dtype, group.device))
    h, label = resolve_heads(heads, full_view(m), src)  # the heads check and bind the whole model's tables
    return _assemble(step_model(m, h), src, h, label, tree)


def _assemble(m, src: ModelSource, h, label: str, tree: str | None) -> Stack:
    dev = m.device
    tok = Tokenizer.load(src)
    cpu_tree = shipped_heads_dir(label) / CPU_TREE if dev.type == "cpu" and label in SHIPPED_HEADS else None

    def default() -> Tree:
        if cpu_tree is not None and cpu_tree.is_file():
            # on a CPU a wide step is not free: the shipped heads' smaller searched tree measured
            # fastest there (benchmarks/BENCHMARKS.md, "A tree sized for the CPU")
            return dataclasses.replace(load_tree(str(cpu_tree)), name=f"{label}-{cpu_tree.stem}")
        if h is not None and h.config.tree:
            return own_tree(h.config, label)
        return load_tree(DEFAULT_TREE if h is not None else "ar")

    return Stack(m, tok, src, h, label, resolve_tree(tree, default))  # "+lookup8" alone: the default tree's
