"""Medusa heads in the reference layout (FasterDecoding/Medusa, also what TGI and TensorRT-LLM
read): a folder with `medusa_lm_head.safetensors` and a `config.json` holding
`medusa_num_heads`, `medusa_num_layers` and `base_model_name_or_path`.

The weights are the reference's `nn.ModuleList` of K `nn.Sequential`s, each L residual blocks
`x + SiLU(W x + b)` then a bias-free LM head [V, D]: keys `{i}.{j}.linear.weight` / `.bias`
(j < L) and `{i}.{L}.weight` (a `medusa_head.` prefix, as some exports write, is accepted).
They load as our MedusaHeads with an LM head of their own per head (`own_lm_head`); a folder
with blocks only (the first releases) shares the base model's LM head.

Such heads carry no fingerprint of the base weights they were trained on, so that check cannot
apply: the hidden and vocabulary sizes are checked instead, and the tree is ours (the shipped
default unless --tree names one; `medusa tree` searches one for these heads). A `.pt` pickle of
the weights is not read (safetensors only). Knows nothing of decoding or of the base model
beyond its sizes and LM head."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medusa.errors import HeadsMismatchError
from medusa.heads.base import HeadsConfig

WEIGHTS, CONFIG = "medusa_lm_head.safetensors", "config.json"
SOURCE = "reference-medusa"
_BLOCK = re.compile(r"(?:medusa_head\.)?(\d+)\.(\d+)\.linear\.(weight|bias)")  # residual block j of head i
_LM = re.compile(r"(?:medusa_head\.)?(\d+)\.(\d+)\.weight")  # head i's LM head, at index L


def is_reference_dir(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / CONFIG).is_file() and ((folder / WEIGHTS).is_file() or (folder / "medusa_lm_head.pt").is_file())


def read_reference(folder: str | Path, hidden_size: int, vocab_size: int) -> tuple[HeadsConfig, dict[str, torch.Tensor]]:
    """(our HeadsConfig, our MedusaHeads state dict) from a reference folder, checked against the
    base model's hidden and vocabulary sizes. HeadsMismatchError (one line) on anything else."""
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file():
        raise HeadsMismatchError(f"{folder} holds medusa_lm_head.pt: only {WEIGHTS} is read "
                                 "(convert it with safetensors.torch.save_file)")
    try:
        cfg = json.loads((folder / CONFIG).read_text())
        K, L = int(cfg["medusa_num_heads"]), int(cfg.get("medusa_num_layers", 1))
        stored = load_file(str(folder / WEIGHTS))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, SafetensorError) as e:
        raise HeadsMismatchError(f"{folder} is not a readable reference Medusa folder ({CONFIG} with "
                                 f"medusa_num_heads, {WEIGHTS}): {e}") from None
    state: dict[str, torch.Tensor] = {}
    for key, t in stored.items():
        block, lm = _BLOCK.fullmatch(key), _LM.fullmatch(key)
        if block and int(block[1]) < K and int(block[2]) < L:
            state[f"blocks.{block[1]}.{block[2]}.linear.{block[3]}"] = t
        elif lm and int(lm[1]) < K and int(lm[2]) == L:
            state[f"lm_heads.{lm[1]}.weight"] = t
        else:
            raise HeadsMismatchError(f"{folder / WEIGHTS}: tensor {key!r} does not fit medusa_num_heads={K}, "
                                     f"medusa_num_layers={L}")
    # the first release kept no LM head per head (the base model's served them all)
    own_lm_head = any(k.startswith("lm_heads.") for k in state)
    want = {f"blocks.{i}.{j}.linear.{x}" for i in range(K) for j in range(L) for x in ("weight", "bias")}
    want |= {f"lm_heads.{i}.weight" for i in range(K)} if own_lm_head else set()
    if set(state) != want:
        missing = sorted(want - set(state))
        raise HeadsMismatchError(f"{folder / WEIGHTS} lacks {len(missing)} tensor(s) for {K} heads of {L} layer(s), "
                                 f"e.g. {missing[0]}")
    if own_lm_head:
        V, D = state["lm_heads.0.weight"].shape
    elif L:
        V, D = vocab_size, state["blocks.0.0.linear.weight"].shape[1]
    else:
        raise HeadsMismatchError(f"{folder / WEIGHTS} holds no weights")
    if (D, V) != (hidden_size, vocab_size):
        raise HeadsMismatchError(
            f"heads in {folder} are for hidden size {D} and vocabulary {V} "
            f"({cfg.get('base_model_name_or_path') or 'base unnamed'}); this model has hidden {hidden_size}, "
            f"vocabulary {vocab_size} (reference heads carry no fingerprint: only the sizes are checked)")
    config = HeadsConfig("medusa", K, L, D, V, base_fingerprint="", base_name=str(cfg.get("base_model_name_or_path", "")),
                         own_lm_head=own_lm_head, extra={"source": SOURCE})
    return config, state


def save_reference(heads, folder: str | Path, base_lm_head: torch.Tensor | None = None, base_name: str = "") -> Path:
    """Write Medusa heads in the reference layout (so TGI / TensorRT-LLM / FasterDecoding read
    them). Heads sharing the base LM head get a copy of it per head (`base_lm_head`)."""
    c = heads.config
    if c.head_type != "medusa":
        raise HeadsMismatchError(f"only Medusa heads have a reference layout, not {c.head_type}")
    if heads.lm_heads is None and base_lm_head is None:
        raise HeadsMismatchError("these heads share the base model's LM head: pass it to write a copy per head")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, torch.Tensor] = {}
    for i, block in enumerate(heads.blocks):
        for j, res in enumerate(block):
            out[f"{i}.{j}.linear.weight"] = res.linear.weight
            out[f"{i}.{j}.linear.bias"] = res.linear.bias
        lm = heads.lm_heads[i].weight if heads.lm_heads is not None else base_lm_head
        out[f"{i}.{c.num_layers}.weight"] = lm
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps({
        "medusa_num_heads": c.num_heads, "medusa_num_layers": c.num_layers,
        "base_model_name_or_path": base_name or c.base_name, "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size}, indent=1))
    return folder
