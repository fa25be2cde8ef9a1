"""Save and load draft heads: `heads.safetensors` + `heads.json` (HeadsConfig) in a folder.
Heads record a fingerprint of the base weights they were trained on; loading them for another
base model is refused with a clear message. A folder in the reference Medusa layout
(`medusa_lm_head.safetensors` + `config.json`, medusa/heads/reference.py) loads too, checked
by hidden and vocabulary size only (it has no fingerprint)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medusa.errors import HeadsMismatchError
from medusa.heads.adapters import attach_adapters, backbone_fingerprint
from medusa.heads.base import DraftHeads, HeadsConfig, with_draft_vocab
from medusa.heads.reference import WEIGHTS as REFERENCE_WEIGHTS
from medusa.heads.reference import is_reference_dir, read_reference

WEIGHTS, CONFIG = "heads.safetensors", "heads.json"


def fingerprint(base) -> str:
    """16 hex digits identifying the base weights, stable across float32/bfloat16 loads:
    the shapes plus the first embedding rows and the final norm, rounded to bfloat16."""
    h = hashlib.sha256()
    cfg = base.cfg
    h.update(f"{cfg.arch}:{cfg.vocab_size}:{cfg.hidden_size}:{cfg.num_layers}".encode())
    for t in (base.embed_tokens.weight[:64], base.norm.weight, base.layers[-1].mlp.down_proj.weight[:8]):
        h.update(t.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def _family(head_type: str):
    from medusa.heads.medusa import MedusaHeads

    families = {"medusa": MedusaHeads}
    try:
        from medusa.heads.hydra import HydraHeads  # noqa: F401  (added with the heads issue)

        families.update({"hydra": HydraHeads, "hydra++": HydraHeads})
    except ImportError:
        pass
    if head_type not in families:
        raise HeadsMismatchError(f"unknown head type {head_type!r}: known {', '.join(families)}")
    return families[head_type]


def build_heads(config: HeadsConfig, base) -> DraftHeads:
    cls = _family(config.head_type)
    return cls(config, base.lm_head.weight.detach())


def save_heads(heads: DraftHeads, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps(heads.config.to_dict(), indent=1))
    return folder


def load_heads(folder: str | Path, base, dtype: torch.dtype | None = None) -> DraftHeads:
    """The heads in `folder`, checked against `base`, on its device in `dtype` (default: the
    base's; training asks for float32, which holds the stored values exactly)."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file() and is_reference_dir(folder):
        return _load_reference(folder, base, dtype)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise HeadsMismatchError(f"{folder} is not a heads folder ({CONFIG} and {WEIGHTS} expected, or the reference "
                                 f"Medusa layout: {REFERENCE_WEIGHTS} and config.json)")
    try:
        config = HeadsConfig.from_dict(json.loads((folder / CONFIG).read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise HeadsMismatchError(f"{folder / CONFIG} is malformed: {e}") from None
    fp = backbone_fingerprint(base, config)  # Medusa-2 heads name the backbone before their adapters
    if (config.hidden_size, config.vocab_size) != (base.cfg.hidden_size, base.cfg.vocab_size) or config.base_fingerprint != fp:
        raise HeadsMismatchError(
            f"heads in {folder} were trained for another base model "
            f"({config.base_name or 'unnamed'}, fingerprint {config.base_fingerprint}, hidden {config.hidden_size}, "
            f"vocab {config.vocab_size}); this model has fingerprint {fp}, hidden {base.cfg.hidden_size}, "
            f"vocab {base.cfg.vocab_size}"
        )
    heads = build_heads(config, base)
    try:
        heads.load_state_dict(load_file(str(folder / WEIGHTS)))
    except RuntimeError as e:
        raise HeadsMismatchError(f"{folder / WEIGHTS} does not match {CONFIG}: {e}") from None
    heads = heads.to(device=base.device, dtype=dtype or base.dtype).eval().requires_grad_(False)
    heads.bind_draft_vocab(base)
    attach_adapters(folder, config, base)  # Medusa-2: the backbone's adapters, merged once
    return heads


def _load_reference(folder: Path, base, dtype: torch.dtype | None) -> DraftHeads:
    config, state = read_reference(folder, base.cfg.hidden_size, base.cfg.vocab_size)
    with torch.device("meta"):  # no copies of the base LM head to overwrite: the stored tensors are taken as they are
        heads = _family(config.head_type)(config, None)
    heads.load_state_dict(state, assign=True)  # read_reference checked the names and sizes
    heads = heads.to(device=base.device, dtype=dtype or base.dtype).eval().requires_grad_(False)
    heads.bind_draft_vocab(base)
    return heads


def grow_heads(heads: DraftHeads, base, num_layers: int | None = None, prefix_intermediate: int | None = None) -> DraftHeads:
    """Trained heads made larger without changing what they compute, to train on from there:
    - `num_layers` adds residual blocks `x + SiLU(W x)` at the end of every head, W zero (so each
      new block starts as the identity and still gets gradients through SiLU'(0) = 1/2);
    - `prefix_intermediate` widens the Hydra++ prefix layer's MLP: the new gate and up rows keep
      their random initialisation and the new down columns are zero, so the layer's output is
      unchanged while every new weight gets gradients (all-zero rows would stay dead).
    Shrinking is refused (ValueError). Returns new heads on the old ones' device and dtype, with
    the same draft vocabulary, or `heads` itself when nothing grows."""
    c = heads.config
    layers = c.num_layers if num_layers is None else num_layers
    extra = dict(c.extra)
    if layers < c.num_layers:
        raise ValueError(f"heads cannot shrink: they have {c.num_layers} layers, {layers} asked")
    if prefix_intermediate is not None:
        if "prefix" not in extra:
            raise ValueError(f"{c.head_type} heads have no prefix layer to widen")
        have = int(extra["prefix"]["intermediate_size"])
        if prefix_intermediate < have:
            raise ValueError(f"the prefix layer cannot shrink: its MLP is {have} wide, {prefix_intermediate} asked")
        extra["prefix"] = {**extra["prefix"], "intermediate_size": int(prefix_intermediate)}
    new_config = dataclasses.replace(c, num_layers=layers, extra=extra)
    if new_config == c:
        return heads
    p = next(heads.parameters())
    grown = build_heads(new_config, base).to(device=p.device, dtype=p.dtype)
    old = heads.state_dict()
    state = grown.state_dict()
    for key, value in state.items():
        if key not in old:
            continue  # a new block: zero-initialised by its constructor
        w = old[key]
        if w.shape == value.shape:
            state[key] = w
        elif key.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
            value[: w.shape[0]] = w  # new rows: random
        elif key.endswith("mlp.down_proj.weight"):
            value.zero_()[:, : w.shape[1]] = w  # new columns: zero
        else:
            raise ValueError(f"cannot grow {key} from {tuple(w.shape)} to {tuple(value.shape)}")
    unknown = set(old) - set(state)
    if unknown:
        raise ValueError(f"weights with no place in the grown heads: {sorted(unknown)}")
    grown.load_state_dict(state)  # the draft vocabulary's ids included
    grown.bind_draft_vocab(base)
    return grown.train(heads.training).requires_grad_(any(q.requires_grad for q in heads.parameters()))


def write_draft_vocab(folder: str | Path, ids: torch.Tensor | None, coverage: float | None = None) -> HeadsConfig:
    """Store (or with None remove) a draft vocabulary in a heads folder, in place: the ids go
    into heads.safetensors next to the weights (which keep their stored dtype), the size and
    coverage into heads.json. Returns the new config."""
    folder = Path(folder)
    try:
        config = HeadsConfig.from_dict(json.loads((folder / CONFIG).read_text()))
        state = load_file(str(folder / WEIGHTS))
    except (OSError, json.JSONDecodeError, TypeError, SafetensorError) as e:
        raise HeadsMismatchError(f"{folder} is not a readable heads folder ({CONFIG} and {WEIGHTS}): {e}") from None
    try:
        config, ids = with_draft_vocab(config, ids, coverage)
    except ValueError as e:
        raise HeadsMismatchError(str(e)) from None
    state.pop("draft_vocab", None)
    if ids is not None:
        state["draft_vocab"] = ids
    # each file is replaced whole (written beside it, then renamed), so an interruption leaves
    # either the old or the new file, never a torn one
    tmp = folder / f".{WEIGHTS}.tmp{os.getpid()}"
    save_file(state, str(tmp))
    os.replace(tmp, folder / WEIGHTS)
    tmp = folder / f".{CONFIG}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(config.to_dict(), indent=1))
    os.replace(tmp, folder / CONFIG)
    return config


def untrained_heads(base, num_heads: int = 4, num_layers: int = 1, name: str = "") -> DraftHeads:
    """Fresh Medusa heads (zero-initialised blocks) for `base`: correct but rarely accepted."""
    cfg = HeadsConfig("medusa", num_heads, num_layers, base.cfg.hidden_size, base.cfg.vocab_size, fingerprint(base), name)
    return build_heads(cfg, base).to(device=base.device, dtype=base.dtype).eval().requires_grad_(False)
