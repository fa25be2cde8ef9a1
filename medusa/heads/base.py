"""The contract every draft-head family (Medusa, Hydra, Hydra++) meets, and their config."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class HeadsConfig:
    head_type: str  # "medusa" | "hydra" | "hydra++"
    num_heads: int  # K: head i guesses the token i+2 after the last committed one
    num_layers: int  # residual blocks (Medusa) or MLP depth (Hydra) per head
    hidden_size: int  # of the base model
    vocab_size: int  # of the base model
    base_fingerprint: str  # medusa.heads.io.fingerprint(base model)
    base_name: str = ""
    own_lm_head: bool = False  # False: share the base model's frozen LM head
    tree: list[list[int]] | None = None  # the tree searched for these heads
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific settings

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HeadsConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class DraftHeads(nn.Module):
    """Base class. A family implements `propose`; families with state of their own (Hydra++'s
    prefix layer KV) override `new_state` and `observe`."""

    config: HeadsConfig

    def new_state(self, batch: int, max_len: int, base) -> Any:
        """Per-request state kept between steps (explicit, never a module attribute)."""
        return None

    def observe(self, state: Any, hidden: torch.Tensor, positions: torch.Tensor, count: torch.Tensor,
                kv_len: int | None = None) -> None:
        """See the base hidden states of newly committed tokens.

        hidden [B, A, D], positions [B, A]; row b's first count[b] entries are real. kv_len, when
        given, bounds every position (known on the host): state caches need attend no further."""

    def propose(self, state: Any, last_hidden: torch.Tensor, root: torch.Tensor, tree, base) -> torch.Tensor:
        """Candidate token of every tree node. last_hidden [B, D] (hidden state of the last
        committed token), root [B] (the base model's chosen next token) -> [B, N]."""
        raise NotImplementedError
