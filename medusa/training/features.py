"""Teacher forcing for draft heads over whole sequences: the label shift, the base model's
hidden states, and each head's output at every position.

The alignment, in one place (t = position of the last token the head has seen):
- the base LM head at t guesses token t+1;
- Medusa / Hydra head i at t guesses token t+2+i (`head_targets`);
- Hydra head i at t also reads the embeddings of tokens t+1 .. t+1+i (`path_embeddings`),
  which at inference are the root and the tree path above the guessed node;
- the teacher distribution for head i at t is the base model's at t+1+i (`teacher_rows`); the
  positions any head needs are those followed by a response token (`teacher_positions`).

Knows nothing of optimisers, data files or trees."""
from __future__ import annotations

import torch

from medusa.heads.hydra import HydraHeads
from medusa.heads.medusa import MedusaHeads


def shift_left(x: torch.Tensor, k: int, fill=0) -> torch.Tensor:
    """y[:, t] = x[:, t + k], the last k positions filled. x [B, T, ...]."""
    if k == 0:
        return x
    pad = torch.full_like(x[:, :k], fill)
    return torch.cat([x[:, k:], pad], dim=1)[:, : x.shape[1]]


def head_targets(tokens: torch.Tensor, target_mask: torch.Tensor, head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets of head `head` at every position: (tokens [B, T], valid [B, T] bool).
    valid[b, t]: token t+2+head exists and is a response token."""
    k = 2 + head
    return shift_left(tokens, k, 0), shift_left(target_mask, k, False)


def path_embeddings(base, tokens: torch.Tensor, head: int) -> torch.Tensor:
    """[B, T, head+1, D]: embeddings of tokens t+1 .. t+1+head at every position t."""
    emb = base.embed_tokens(tokens)  # [B, T, D]
    return torch.stack([shift_left(emb, j, 0.0) for j in range(1, head + 2)], dim=2)


def teacher_positions(target_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: positions s whose base distribution some head learns (token s+1 is a
    response token). Head i's valid positions t map into them: s = t+1+i, token t+2+i."""
    return shift_left(target_mask, 1, False)


def teacher_rows(row: torch.Tensor, head: int) -> torch.Tensor:
    """[B, T]: for every position t, the teacher row (of `row` [B, T], from
    losses.teacher_probs) of the base distribution head `head` learns at t: position t+1+head."""
    return shift_left(row, 1 + head, -1)


@torch.no_grad()
def base_hidden(base, tokens: torch.Tensor) -> torch.Tensor:
    """The frozen base model over whole right-padded sequences, no KV kept: [B, T, D]."""
    return model_hidden(base, tokens)


class LayerwiseCache:
    """A throwaway KV cache for a forward that trains: each layer's keys and values are a new
    tensor (an out-of-place write), where the model's own cache keeps every layer in one tensor
    that each layer's write changes in place, which autograd refuses for the K/V an earlier
    layer saved for backward. Offers what the attention layers use: write, k[layer], v[layer]."""

    def __init__(self, base, batch: int, max_len: int):
        self.shape = (batch, max_len, 2, base.cfg.num_kv_heads, base.cfg.head_dim)
        self.dtype, self.device = base.dtype, base.device
        self.k: list[torch.Tensor | None] = [None] * base.cfg.num_layers  # [B, Hkv, S, Dh] each
        self.v: list[torch.Tensor | None] = [None] * base.cfg.num_layers

    def write(self, layer: int, rows: torch.Tensor, slots: torch.Tensor, kv: torch.Tensor) -> None:
        B, N, _, Dh = kv.shape
        kv = kv.view(B, N, 2, -1, Dh)
        t = torch.zeros(self.shape, dtype=kv.dtype, device=self.device).index_put((rows, slots), kv)
        self.k[layer] = t[:, :, 0].transpose(1, 2)
        self.v[layer] = t[:, :, 1].transpose(1, 2)


def model_hidden(base, tokens: torch.Tensor) -> torch.Tensor:
    """`base_hidden` with gradients where the model has trainable parameters (joint training's
    adapters). The model's own forward, so training sees the inference numerics, over a
    throwaway cache (one of its own per layer where gradients flow)."""
    B, T = tokens.shape
    pos = torch.arange(T, device=tokens.device)[None].expand(B, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()[None].expand(B, T, T)
    cache = LayerwiseCache(base, B, T) if torch.is_grad_enabled() else base.new_cache(B, T)
    return base(tokens, pos, cache, pos, causal, logits_for=None).hidden


def head_features(heads, base, tokens: torch.Tensor, hidden: torch.Tensor) -> list[torch.Tensor]:
    """z_i [B, T, D] per head: what head i feeds its LM head at every position."""
    K = heads.config.num_heads
    if isinstance(heads, MedusaHeads):
        return [heads.blocks[i](hidden) for i in range(K)]
    if isinstance(heads, HydraHeads):
        s = heads.summary(hidden, base)  # [B, T, D]
        return [heads.head_hidden(i, s, path_embeddings(base, tokens, i).to(s.dtype)) for i in range(K)]
    raise TypeError(f"no teacher forcing for {type(heads).__name__}")

