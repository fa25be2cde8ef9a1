"""Megatron-style sharding of a built Transformer, applied from outside (the model reads its
head counts from attributes, which are set here to the rank's share):

- q/k/v and gate/up are column-parallel: rank r keeps whole attention heads, the KV heads they
  read, and a block of the MLP's columns. Where there are fewer KV heads than ranks, each KV
  head is replicated on tp / kv_heads ranks (as vLLM does); otherwise the size must divide them.
- o and down are row-parallel: each rank's partial output is summed by one all-reduce, run by a
  forward hook on the Attention and MLP modules (their outputs), so the fused and unfused paths
  of llama.py (the fused MLP reads down_proj.weight directly) both reduce, and llama.py is
  unchanged.
- the embedding and the LM head are vocabulary-parallel: each rank holds ceil(V / tp) rows
  (the last padded with zero rows); an embedding lookup is the rows a rank holds, zeros
  elsewhere, then an all-reduce. The LM head's forward gathers the full logits (the step
  functions read them whole); `local_logits` + `distributed_argmax` give greedy decoding
  without gathering them.
- the KV cache follows from the per-rank config (`model.cfg`: the rank's heads): each rank's
  cache holds its KV heads for every row, so commits, row swaps and session reuse are the same
  per-rank operations as before.

`keep` is the one table of which slice each weight name keeps: the in-memory sharding here and
the checkpoint loader (load.py) both read it. Does not know about processes (see launch.py)
or decoding."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from medusa.model.config import ModelConfig
from medusa.parallel.comm import Group, ParallelError


class Layout(NamedTuple):
    heads: int  # attention heads per rank
    kv_heads: int  # KV heads per rank
    kv_first: int  # this rank's first KV head
    ffn: int  # MLP columns per rank
    vocab: int  # vocabulary rows per rank (padded: ceil(V / tp))
    vocab_first: int  # this rank's first vocabulary row


def layout(cfg: ModelConfig, rank: int, world: int) -> Layout:
    """This rank's share of `cfg` (the whole model's config); ParallelError where `world` does
    not split it into whole heads."""
    H, Hkv, Fdim, V = cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, cfg.vocab_size
    if H % world:
        raise ParallelError(f"tensor parallel size {world} does not divide the model's {H} attention heads")
    if Hkv % world and world % Hkv:
        raise ParallelError(f"tensor parallel size {world} neither divides the model's {Hkv} KV heads "
                            f"nor is a multiple of them")
    if Fdim % world:
        raise ParallelError(f"tensor parallel size {world} does not divide the MLP width {Fdim}")
    if Hkv >= world:
        kv, kv_first = Hkv // world, rank * (Hkv // world)
    else:  # replicated KV heads: rank r's query heads all read KV head r * Hkv // world
        kv, kv_first = 1, rank * Hkv // world
    per = -(-V // world)
    return Layout(H // world, kv, kv_first, Fdim // world, per, rank * per)


class Cut(NamedTuple):
    """Keep rows (dim 0) or columns (dim 1) start .. stop-1 of a weight; dim -1 (ZERO): keep
    the tensor's shape, all zeros (a row-parallel bias on every rank but the first: the
    all-reduce after the projection adds it once)."""

    dim: int
    start: int
    stop: int


ZERO = Cut(-1, 0, 0)


def keep(name: str, cfg: ModelConfig, rank: int, world: int) -> Cut | None:
    """The part of parameter `name` (the model's names, HF's minus `model.`) rank keeps, or
    None: the whole tensor (norms; everything at world 1). Vocabulary cuts stop at V: the
    padding rows are not in the checkpoint."""
    if world == 1:
        return None
    lay = layout(cfg, rank, world)
    Dh = cfg.head_dim
    leaf = name.rsplit(".", 2)[-2:]  # [module, weight|bias]
    mod = leaf[0] if len(leaf) == 2 else ""
    if mod == "q_proj":
        return Cut(0, rank * lay.heads * Dh, (rank + 1) * lay.heads * Dh)
    if mod in ("k_proj", "v_proj"):
        return Cut(0, lay.kv_first * Dh, (lay.kv_first + lay.kv_heads) * Dh)
    if mod in ("o_proj", "down_proj") and name.endswith(".bias"):
        return None if rank == 0 else ZERO
    if mod == "o_proj":
        return Cut(1, rank * lay.heads * Dh, (rank + 1) * lay.heads * Dh)
    if mod in ("gate_proj", "up_proj"):
        return Cut(0, rank * lay.ffn, (rank + 1) * lay.ffn)
    if mod == "down_proj":
        return Cut(1, rank * lay.ffn, (rank + 1) * lay.ffn)
    if name in ("embed_tokens.weight", "lm_head.weight"):
        return Cut(0, min(lay.vocab_first, cfg.vocab_size), min(lay.vocab_first + lay.vocab, cfg.vocab_size))
    return None


def take(t: torch.Tensor, cut: Cut | None) -> torch.Tensor:
    """The kept part of a whole tensor, as a copy (so the whole one can be freed)."""
    if cut is None:
        return t
    return torch.zeros_like(t) if cut == ZERO else t.narrow(cut.dim, cut.start, cut.stop - cut.start).clone()


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t [R, D] with zero rows appended up to `rows` (the vocabulary's last shard)."""
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


class VocabParallelEmbedding(nn.Module):
    """Rows vocab_first .. vocab_first + R - 1 of the embedding; a lookup sums every rank's
    part (exactly one rank holds each token)."""

    def __init__(self, weight: torch.Tensor, vocab_first: int, vocab_size: int, group: Group):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [R, D]
        self.vocab_first, self.vocab_size, self.group = vocab_first, vocab_size, group

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_first
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)  # [..., D]
        return self.group.all_reduce(x.masked_fill(outside[..., None], 0.0))


class VocabParallelLMHead(nn.Module):
    """Rows vocab_first .. of the LM head (the embedding's own rows when tied). forward gathers
    the full logits [..., V]; local_logits gives this rank's columns only."""

    def __init__(self, weight: torch.Tensor | nn.Parameter, vocab_first: int, vocab_size: int, group: Group):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.vocab_first, self.vocab_size, self.group = vocab_first, vocab_size, group

    def local_logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)  # [..., R]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.group.all_gather(self.local_logits(h), dim=-1)[..., :self.vocab_size]  # [..., V]


def distributed_argmax(local: torch.Tensor, head: VocabParallelLMHead) -> torch.Tensor:
    """The argmax over the whole vocabulary of logits held in vocabulary shards, gathering one
    (value, index) pair per rank instead of the logits: local [..., R] -> [...] long. Ties go
    to the lowest token id, as torch.argmax over the full logits does."""
    real = head.vocab_size - head.vocab_first  # columns past it are padding
    if real < local.shape[-1]:
        local = local.clone()
        local[..., max(real, 0):] = float("-inf")
    val, idx = local.float().max(-1)  # first maximum within the shard
    pair = torch.stack([val.double(), (idx + head.vocab_first).double()], -1)[..., None, :]  # [..., 1, 2]
    both = head.group.all_gather(pair, dim=-2)  # [..., world, 2]: exact in float64
    best = both[..., 0].argmax(-1, keepdim=True)  # the first (lowest-vocabulary) rank among equals
    return both[..., 1].gather(-1, best).squeeze(-1).long()


def _set(lin: nn.Linear, name: str, cfg: ModelConfig, rank: int, world: int) -> None:
    for attr in ("weight", "bias"):
        p = getattr(lin, attr)
        if p is not None:
            setattr(lin, attr, nn.Parameter(take(p.detach(), keep(f"{name}.{attr}", cfg, rank, world)), requires_grad=False))
    lin.out_features, lin.in_features = lin.weight.shape


def _reduce_output(module, args, out):
    """Forward hook: the partial sums of a row-parallel projection, summed over ranks."""
    return module.tp_group.all_reduce(out)


def shard_model(model, group: Group):
    """Keep this rank's slices of `model` (a Transformer, on any device, meta included) and
    wire its collectives; returns the same model (world 1: the whole weights, the same modules
    as any world, identity collectives). model.cfg becomes the rank's config (its heads
    and MLP width: what new_cache and the heads' checks read); model.full_cfg keeps the whole
    one. A model whose projections were fused is fused again over its slices."""
    if getattr(model, "full_cfg", None) is not None:
        raise ParallelError("this model is already sharded")
    cfg, rank, world = model.cfg, group.rank, group.world
    lay = layout(cfg, rank, world)
    fused = model.layers[0].self_attn.qkv_weight is not None
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            _set(getattr(attn, proj), f"layers.{i}.self_attn.{proj}", cfg, rank, world)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            _set(getattr(mlp, proj), f"layers.{i}.mlp.{proj}", cfg, rank, world)
        attn.n_heads, attn.n_kv = lay.heads, lay.kv_heads
        attn.qkv_weight = attn.qkv_bias = attn.qkv_scale = mlp.gate_up_weight = mlp.gate_up_scale = None
        for m in (attn, mlp):
            m.tp_group = group
            if world > 1:  # world 1: nothing to sum, no hook on the path
                m.register_forward_hook(_reduce_output)
        if fused:
            layer.fuse()
    emb = pad_rows(take(model.embed_tokens.weight.detach(), keep("embed_tokens.weight", cfg, rank, world)), lay.vocab)
    model.embed_tokens = VocabParallelEmbedding(emb, lay.vocab_first, cfg.vocab_size, group)
    if cfg.tie_word_embeddings:
        head = model.embed_tokens.weight
    else:
        head = pad_rows(take(model.lm_head.weight.detach(), keep("lm_head.weight", cfg, rank, world)), lay.vocab)
    model.lm_head = VocabParallelLMHead(head, lay.vocab_first, cfg.vocab_size, group)
    model.full_cfg, model.tp_group = cfg, group
    model.cfg = cfg.replace(num_heads=lay.heads, num_kv_heads=lay.kv_heads, intermediate_size=lay.ffn)
    return model
