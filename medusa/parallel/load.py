"""Load one rank's shard of a Llama-family checkpoint: the model is built on the meta device
(no memory), sharded (shard.py), allocated at the rank's size, and each weight's kept slice is
read with safetensors' `get_slice`, which reads those bytes only, never the whole tensor. So a
model larger than one device loads, each rank holding about 1/tp of it.

A GGUF file is first dequantised whole into the HF cache directory by medusa.model.loading
(once, on the host, by whichever process resolves it first: start the ranks after resolving),
then read by slices like any safetensors checkpoint.

Also: the whole-model view that heads loading needs (`full_view`): the heads' fingerprint and
draft vocabulary read rows of the embedding, the LM head and the last MLP.

Does not know about processes or decoding."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open

from medusa.errors import ModelLoadError
from medusa.kernels.attention_choice import check_attention_setting
from medusa.model.llama import Transformer
from medusa.model.loading import _safetensors_files, read_config, resolve
from medusa.model.rope import rope_table
from medusa.parallel.comm import Group
from medusa.parallel.shard import ZERO, keep, pad_rows, shard_model


def _read(st, key: str, cut) -> torch.Tensor:
    if cut is None:
        return st.get_tensor(key)
    if cut == ZERO:  # a row-parallel bias (small): added once, by the first rank
        return torch.zeros_like(st.get_tensor(key))
    part = st.get_slice(key)
    index = tuple(slice(cut.start, cut.stop) if d == cut.dim else slice(None) for d in range(len(part.get_shape())))
    return part[index]


def load_sharded(path, group: Group, dtype: torch.dtype | None = None):
    """This rank's shard of the model at `path` (HF directory or GGUF; None: the default model),
    on group.device. Returns (model, source) as medusa.model.loading.load_model does."""
    check_attention_setting()
    device = group.device
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    src = resolve(path)
    cfg = read_config(src.hf_dir)
    with torch.device("meta"):
        model = shard_model(Transformer(cfg), group)
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    try:
        for f in _safetensors_files(src.hf_dir):
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for key in st.keys():
                    name = key[len("model."):] if key.startswith("model.") else key
                    if name not in params:
                        if "rotary_emb" in name or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                            continue
                        raise ModelLoadError(f"unexpected tensor {key!r} in {f.name}")
                    t = _read(st, key, keep(name, cfg, group.rank, group.world))
                    if name in ("embed_tokens.weight", "lm_head.weight"):
                        t = pad_rows(t, params[name].shape[0])
                    if tuple(t.shape) != tuple(params[name].shape):
                        raise ModelLoadError(f"{key}: shard shape {tuple(t.shape)} != expected {tuple(params[name].shape)}")
                    with torch.no_grad():
                        params[name].copy_(t.to(torch.float32))
                    loaded.add(name)
    except (OSError, RuntimeError) as e:
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"cannot read weights in {src.hf_dir}: {e}") from None
    missing = set(params) - loaded - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    if missing:
        raise ModelLoadError(f"weights missing from {src.hf_dir}: {sorted(missing)[:5]} ...")
    model = model.to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    cos, sin = rope_table(cfg.max_position_embeddings, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    model.eval().requires_grad_(False).fuse_projections_where_faster()
    return model, src


def full_embedding(model) -> torch.Tensor:
    """The whole embedding table [V, D], gathered from the shards (a collective: every rank
    calls it). Hydra heads index it by token id."""
    return model.tp_group.all_gather(model.embed_tokens.weight.detach(), dim=0)[:model.full_cfg.vocab_size]


def full_view(model) -> SimpleNamespace:
    """What medusa.heads.io.load_heads reads of a base model, whole, for a sharded one (a
    collective: every rank calls it): the config, the embedding and LM head tables, the final
    norm and the last MLP's down projection. Temporary: drop it once the heads are loaded."""
    emb = full_embedding(model)
    if model.full_cfg.tie_word_embeddings:
        head = emb
    else:
        head = model.tp_group.all_gather(model.lm_head.weight.detach(), dim=0)[:model.full_cfg.vocab_size]
    down = model.tp_group.all_gather(model.layers[-1].mlp.down_proj.weight.detach(), dim=1)
    last = SimpleNamespace(mlp=SimpleNamespace(down_proj=SimpleNamespace(weight=down)))
    return SimpleNamespace(cfg=model.full_cfg, embed_tokens=SimpleNamespace(weight=emb), lm_head=SimpleNamespace(weight=head),
                           norm=model.norm, layers=[last], device=model.device, dtype=model.dtype)


def load_heads_sharded(folder: str | Path, model):
    """Draft heads for a sharded base, replicated on this rank (see lockstep.py for why),
    checked against the whole model's fingerprint, their draft vocabulary bound to the whole
    LM head's rows. A collective: every rank calls it."""
    from medusa.heads.io import load_heads

    return load_heads(folder, full_view(model))
