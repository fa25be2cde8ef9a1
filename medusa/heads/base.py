"""The contract every draft-head family (Medusa, Hydra, Hydra++) meets, and their config."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from medusa.kernels.topk import topk_ids


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


def with_draft_vocab(config: HeadsConfig, ids, coverage: float | None = None) -> tuple[HeadsConfig, torch.Tensor | None]:
    """`config` with draft vocabulary `ids` recorded in its extra (size, and coverage: the share
    of training tokens they hold), or with none (ids None), and the ids as a flat long tensor.
    ValueError unless they are 1 to V distinct token ids below V."""
    extra = {k: v for k, v in config.extra.items() if k not in ("draft_vocab", "draft_vocab_coverage")}
    if ids is not None:
        V = config.vocab_size
        ids = torch.as_tensor(ids, dtype=torch.long).flatten().contiguous()
        if ids.numel() < 1 or int(ids.min()) < 0 or int(ids.max()) >= V or ids.unique().numel() != ids.numel():
            raise ValueError(f"a draft vocabulary is 1 to {V} distinct token ids below {V}")
        extra["draft_vocab"] = int(ids.numel())
        if coverage is not None:
            extra["draft_vocab_coverage"] = round(float(coverage), 6)
    return dataclasses.replace(config, extra=extra), ids


@dataclass(frozen=True)
class Seen:
    """What one forward of the base model shows the draft heads (`DraftHeads.see`), explicitly:
    the final hidden states of its new tokens, where they sit (RoPE positions, cache slots, the
    mask of cache slots each may see) and which of them are now committed. A prompt commits its
    first count[b] tokens at their slots; a verification step commits its accepted path, whose
    K/V moved from slots src to dst (as `KVCache.commit_path`)."""

    hidden: torch.Tensor  # [B, N, D]
    positions: torch.Tensor  # [B, N] long
    slots: torch.Tensor  # [B, N] long
    mask: torch.Tensor  # [B, N, S] bool: may token n see cache slot s
    kv_len: int  # S, known on the host
    count: torch.Tensor | None = None  # [B] long, a prompt: real (committed) tokens per row
    src: torch.Tensor | None = None  # [B, A] long, a step: slots of the accepted path's nodes
    dst: torch.Tensor | None = None  # [B, A] long, a step: the committed slots they move to
    last_node: torch.Tensor | None = None  # [B] long, a step: the last accepted node of each row

    @property
    def prompt(self) -> bool:
        return self.src is None


class DraftHeads(nn.Module):
    """Base class. A family implements `propose`; families with state of their own (Hydra++'s
    prefix layer KV) override `new_state`, `observe`, `see` and `prepare`.

    Draft vocabulary (optional, config.extra["draft_vocab"] = F): the heads propose only among
    F token ids (the tokens most frequent in their training responses, `draft_vocab_from`), so
    that each head's LM-head GEMM and top-k run over F rows of the vocabulary instead of all V.
    Verification still scores the whole vocabulary, so output is unchanged; only proposals of
    tokens outside the set are lost. The ids are stored with the weights; the F rows of the LM
    head(s) are gathered once (`bind_draft_vocab`) into a buffer that is not saved."""

    config: HeadsConfig
    lm_heads: nn.ModuleList | None  # own LM head per head, or None: the base model's (shared, frozen)
    draft_vocab: torch.Tensor | None  # [F] long token ids
    draft_weight: torch.Tensor | None  # [1 or K, F, D]: LM-head rows of draft_vocab (shared or per head)

    def __init__(self):
        super().__init__()
        self.register_buffer("draft_vocab", None)  # sized by _init_draft_vocab, filled by loading
        self.register_buffer("draft_weight", None, persistent=False)

    def _init_lm_heads(self, base_lm_head: torch.Tensor | None) -> None:
        """Called by a family's __init__ once self.config is set: an own LM head per head when the
        config asks for one (initialised from the base model's, when given), and room for the
        draft vocabulary's stored ids."""
        c = self.config
        self.lm_heads = None
        if c.own_lm_head:
            self.lm_heads = nn.ModuleList(nn.Linear(c.hidden_size, c.vocab_size, bias=False) for _ in range(c.num_heads))
            if base_lm_head is not None:
                for h in self.lm_heads:
                    h.weight.data.copy_(base_lm_head)
        self._init_draft_vocab()

    def _init_draft_vocab(self) -> None:
        """Called by a family's __init__ once self.config is set: room for the stored ids."""
        n = int(self.config.extra.get("draft_vocab", 0) or 0)
        self.draft_vocab = torch.zeros(n, dtype=torch.long) if n else None

    def lm_logits(self, i: int, z: torch.Tensor, base) -> torch.Tensor:
        """Head i's logits over the whole vocabulary: z [..., D] -> [..., V]."""
        return self.lm_heads[i](z) if self.lm_heads is not None else base.lm_head(z)

    def bind_draft_vocab(self, base) -> None:
        """Gather the draft vocabulary's LM-head rows (after the weights are loaded or set)."""
        if self.draft_vocab is None:
            self.draft_weight = None
            return
        ids = self.draft_vocab
        with torch.no_grad():
            if self.lm_heads is not None:
                w = torch.stack([h.weight.detach()[ids.to(h.weight.device)] for h in self.lm_heads])
            else:
                w = base.lm_head.weight.detach()[ids.to(base.lm_head.weight.device)][None]
        self.draft_weight = w.contiguous()

    def set_draft_vocab(self, ids: torch.Tensor | None, base, coverage: float | None = None) -> None:
        """Restrict proposals to token ids `ids` [F] (None: the whole vocabulary again);
        coverage (the share of training tokens they hold) is recorded in the config."""
        self.config, ids = with_draft_vocab(self.config, ids, coverage)
        dev = next((t.device for t in self.parameters()), base.lm_head.weight.device)
        self.draft_vocab = None if ids is None else ids.to(dev)
        self.bind_draft_vocab(base)

    def _draft_logits(self, i: int, z: torch.Tensor, base) -> torch.Tensor:
        """Head i's logits over the draft vocabulary (or the whole one): z [..., D] -> [..., F]."""
        if self.draft_vocab is None:
            return self.lm_logits(i, z, base)
        if self.draft_weight is None:
            raise RuntimeError("the draft vocabulary's LM-head rows are not bound: call bind_draft_vocab(base) "
                               "once the weights are loaded (medusa.heads.io does)")
        return torch.nn.functional.linear(z, self.draft_weight[i if self.draft_weight.shape[0] > 1 else 0])

    def draft_topk(self, i: int, z: torch.Tensor, base, k: int, into=None) -> torch.Tensor:
        """The token ids of head i's k best guesses, best first: z [..., D] -> [..., k] long.
        With a draft vocabulary, the best among its tokens. into: a medusa.kernels.topk.Into
        (z [B, P, D]: the guesses go into its table [B, N] instead; the table is returned)."""
        return topk_ids(self._draft_logits(i, z, base), k, self.draft_vocab, into=into)

    def draft_topk_each(self, z: torch.Tensor, base, k: int) -> torch.Tensor:
        """draft_topk for every head at once: z [..., K, D] holds head j's features at [..., j, :]
        -> [..., K, k]. Heads sharing the LM head take one GEMM, and all take one top-k."""
        if self.lm_heads is None:
            logits = self._draft_logits(0, z, base)  # the same rows for every head
        else:
            logits = torch.stack([self._draft_logits(j, z[..., j, :], base) for j in range(z.shape[-2])], dim=-2)
        return topk_ids(logits, k, self.draft_vocab)

    def draft_topk_logp(self, i: int, z: torch.Tensor, base, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Head i's k best guesses and their log-probabilities (softmax over the draft vocabulary,
        or the whole one), best first: z [..., D] -> token ids [..., k] long, logp [..., k] float32.
        The confidences a dynamic tree ranks its nodes by (medusa.decoding.dynamic_tree)."""
        logits = self._draft_logits(i, z, base)  # [..., F]
        k = min(k, logits.shape[-1])
        cols = topk_ids(logits, k)  # columns, best first
        lse = torch.logsumexp(logits.float(), dim=-1, keepdim=True)
        logp = logits.gather(-1, cols).float() - lse
        return (self.draft_vocab[cols] if self.draft_vocab is not None else cols), logp

    def draft_children(self, state: Any, last_hidden: torch.Tensor, level: int, chains: torch.Tensor, k: int,
                       base) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best children of W tree nodes at depth `level` (head `level`'s guesses for the
        token after each node) and their log-probabilities. chains [B, W, level + 1]: the tokens
        from the root to each node. -> token ids [B, W or 1, k], logp [B, W or 1, k] (W == 1:
        the same children for every node, a family whose heads do not read the path).
        Families that can grow dynamic trees implement it."""
        raise NotImplementedError(f"{self.config.head_type} heads cannot grow dynamic trees")

    @property
    def grows_trees(self) -> bool:
        """Whether this family drafts dynamic trees (implements `draft_children`)."""
        return type(self).draft_children is not DraftHeads.draft_children

    def grow(self, state: Any, last_hidden: torch.Tensor, root: torch.Tensor, tree, base):
        """The dynamic tree of each row for this step (medusa.decoding.dynamic_tree.grow over
        `draft_children`): a RowTrees of tree.head_nodes nodes, tree.max_depth deep (bound)."""
        from medusa.decoding.dynamic_tree import grow

        def children(level: int, chains: torch.Tensor):
            return self.draft_children(state, last_hidden, level, chains, tree.topk, base)

        return grow(children, root, tree.head_nodes, tree.max_depth, tree.topk, tree.threshold)

    def new_state(self, batch: int, max_len: int, base, lazy: bool = False) -> Any:
        """Per-request state kept between steps (explicit, never a module attribute). lazy: the
        state may keep what plain steps and prompts show it (`see`) pending, and take it in only
        when `prepare` announces a speculative step (Hydra++: plain decoding then never runs its
        prefix layer); a lazy state needs `prepare` before every step."""
        return None

    def observe(self, state: Any, hidden: torch.Tensor, positions: torch.Tensor, count: torch.Tensor,
                kv_len: int | None = None) -> None:
        """See the base hidden states of newly committed tokens, now.

        hidden [B, A, D], positions [B, A]; row b's first count[b] entries are real. kv_len, when
        given, bounds every position (known on the host): state caches need attend no further."""

    def see(self, state: Any, seen: "Seen") -> None:
        """What one forward of the base model (a prompt, or a verification step once its
        acceptance is known) shows the heads, called inside the step (also inside a captured
        graph: no host synchronisation). A family with state keeps what it needs; a lazy state
        (`new_state(lazy=True)`) may store it instead, for `prepare` to take in later. Stateless
        families ignore it."""

    def prepare(self, state: Any, lo: int, kv_lens: list[int], speculating: bool) -> int:
        """Host side, outside any captured graph, before a step or a prompt forward over rows
        lo .. lo+len(kv_lens)-1 of `state`, which hold kv_lens[i] committed tokens each.
        speculating: the step proposes candidates (a prompt forward and a plain step do not).
        A lazy state catches up here on what it stored. Returns the rows caught up (0: nothing
        ran on the device)."""
        return 0

    def propose(self, state: Any, last_hidden: torch.Tensor, root: torch.Tensor, tree, base) -> torch.Tensor:
        """Candidate token of every tree node. last_hidden [B, D] (hidden state of the last
        committed token), root [B] (the base model's chosen next token) -> [B, N]."""
        raise NotImplementedError
