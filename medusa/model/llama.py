"""A compact Llama-family decoder (llama, mistral, qwen2, qwen3 shapes): RMSNorm, RoPE, grouped-query
attention over a static KV cache, SwiGLU MLP, tied or untied embeddings, optional q/k/v bias,
optional per-head q/k RMSNorm (Qwen3).

`forward` runs N new tokens per row at explicit positions, writes their K/V at explicit cache
slots and lets each token see exactly the cache slots its mask allows, which is all a tree
verification pass needs. The model does not know about trees, heads, batching policy,
parallelism or compilation; those are applied from outside (compiled per-layer pieces come in
as a `BlockOps` argument of the forward, never by rebinding the modules' methods)."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medusa.kernels.attention import tree_attention
from medusa.kernels.attention_choice import TRITON_MAX_TOKENS, use_matmul_attention, use_triton_attention
from medusa.model import fp8
from medusa.model.config import ModelConfig
from medusa.model.kv_cache import KVCache
from medusa.model.rope import apply_rope, rope_table

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # cuDNN attention builds an execution plan for every new shape (80-550 ms each on an H100,
    # measured), and prefill brings a new prompt length with nearly every request; the other
    # fused kernels take arbitrary shapes at once
    _SDPA_BACKENDS = [b for b in (getattr(SDPBackend, n, None) for n in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"))
                      if b is not None]
except ImportError:  # pragma: no cover
    sdpa_kernel = None


@functools.lru_cache(maxsize=None)
def _bmm_takes_out_dtype(device: torch.device) -> bool:
    """Whether this torch's bmm takes out_dtype on `device` (probed once, at the first
    attention call, which comes before any graph capture: capture warms up eagerly)."""
    a = torch.zeros(1, 1, 1, device=device, dtype=torch.bfloat16)
    try:
        torch.bmm(a, a, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def _bmm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result (bfloat16 and float16 inputs accumulate in float32 anyway).
    bmm's out_dtype form has no backward, so a forward that trains (head training runs the
    Hydra++ prefix layer with gradients) takes the float32 copies instead."""
    grad = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    if a.dtype != torch.float32 and a.is_cuda and not grad and _bmm_takes_out_dtype(a.device):
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def attend_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hidden: torch.Tensor,
                  scale: float = 1.0) -> torch.Tensor:
    """SDPA's result for q [B, Hkv, R, Dh], k and v [B, Hkv, S, Dh], hidden [B, 1, R, S] bool
    (True: may NOT attend; the inverse of SDPA's mask), with the scores and the softmax in
    float32. The model passes queries already scaled (`Attention.inputs`), so scale = 1."""
    B, Hkv, R, Dh = q.shape
    S = k.shape[2]
    scores = _bmm_f32(q.reshape(B * Hkv, R, Dh), k.reshape(B * Hkv, S, Dh).transpose(1, 2)).view(B, Hkv, R, S)
    scores = scores.masked_fill_(hidden, float("-inf"))
    if scale != 1.0:
        scores = scores.mul_(scale)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


@dataclass(frozen=True)
class LayerInputs:
    """What every attention layer of one forward pass shares, built once (`Attention.inputs`)
    rather than in each layer."""

    cos: torch.Tensor  # [B, N, H + 2 Hkv, Dh] per-head RoPE tables in the activations' dtype (below)
    sin: torch.Tensor  # signed sine (rope.py)
    rows: torch.Tensor  # [B, 1] row index of the cache write
    slots: torch.Tensor  # [B, N] cache slots where the new K/V go
    mask: torch.Tensor | None  # [B, 1, rep * N, S] bool over folded query rows: True = visible (SDPA) / hidden (matmul); None when the kernel runs without gradients
    matmul: bool  # attention path: attend_matmul (else SDPA)
    kv_len: int  # S
    visible: torch.Tensor | None = None  # [B, N, S] bool, set when the Triton kernel is to run


class BlockOps:
    """How a forward runs the pure per-layer pieces: the RMSNorms, the q/k/v projection with RoPE
    (`Attention.project`) and the SwiGLU MLP. This default calls the modules as written; a
    caller may pass another (`Transformer.forward(ops=...)`), such as compiled copies of the
    pieces (medusa.decoding.graphs.CompiledBlocks), without the model changing. The K/V cache
    writes and attention always run as written."""

    def norm(self, norm: "RMSNorm", x: torch.Tensor) -> torch.Tensor:
        return norm(x)

    def project(self, attn: "Attention", x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        return attn.project(x, cos, sin)

    def mlp(self, mlp: "MLP", x: torch.Tensor) -> torch.Tensor:
        return mlp(x)


EAGER = BlockOps()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel on a GPU (seven elementwise and reduction kernels written out); it
        # accumulates in float32 and rounds once, where HF rounds before the weight's multiply.
        # A float32 weight under bfloat16 autocast (head training) is cast to the input's dtype:
        # mixed dtypes have no fused kernel and fall back with a warning.
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)


def _fuse_linears(*lins: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Concatenate the linears' weights (and biases) along the output dim and make each linear's
    parameters views of the result: one GEMM reads them all, and the memory is not doubled.
    Returns (weight, bias, FP8 per-channel scale or None): FP8 projections fuse with their
    scales (medusa.model.fp8.fuse), and `_linear` runs either kind."""
    if all(isinstance(lin, fp8.FP8Linear) for lin in lins):
        weight, scale, bias = fp8.fuse(list(lins))
        return weight, bias, scale
    if any(isinstance(lin, fp8.FP8Linear) for lin in lins):
        raise ValueError("cannot fuse FP8 projections with unquantised ones")
    weight = torch.cat([lin.weight.detach() for lin in lins])
    has_bias = [lin.bias is not None for lin in lins]
    bias = torch.cat([lin.bias.detach() for lin in lins]) if all(has_bias) else None
    if any(has_bias) and bias is None:
        raise ValueError("cannot fuse linears of which only some have a bias")
    at = 0
    for lin in lins:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(weight[at: at + n], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[at: at + n], requires_grad=False)
        at += n
    return weight, bias, None


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None) -> torch.Tensor:
    """A fused projection: F.linear, or medusa.model.fp8.linear where it is FP8 (scale given)."""
    return F.linear(x, weight, bias) if scale is None else fp8.linear(x, weight, scale, bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=bias)
        # Llama and Qwen3 give o_proj a bias with the others; Qwen2's q/k/v bias stops there
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=bias and cfg.arch != "qwen2")
        # Qwen3: an RMSNorm over each head's Dh features of q and of k, before RoPE
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.register_buffer("qkv_weight", None, persistent=False)  # set by fuse(): q, k, v in one GEMM
        self.register_buffer("qkv_bias", None, persistent=False)
        self.register_buffer("qkv_scale", None, persistent=False)  # FP8 projections: their per-channel scales

    @property
    def rep(self) -> int:  # query heads per kv head
        return self.n_heads // self.n_kv

    def fold_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """[B, N, S] bool -> [B, 1, rep * N, S]: the mask for `forward`'s folded query rows
        (row r * N + n is query head r of a kv head, token n)."""
        mask = mask[:, None]
        return mask.repeat(1, 1, self.rep, 1) if self.rep > 1 else mask

    def inputs(self, dtype: torch.dtype, cos_t: torch.Tensor, sin_t: torch.Tensor, positions: torch.Tensor,
               slots: torch.Tensor, mask: torch.Tensor) -> LayerInputs:
        """Everything the layers of one forward share, from RoPE tables cos_t / sin_t [P, Dh]
        (float32), positions and slots [B, N] and mask [B, N, S] bool (may query n see slot s).

        The RoPE tables cover every head of the fused projection's output, so that one set of
        elementwise kernels rotates the contiguous q/k/v tensor (faster than rotating its
        strided q/k part): the query heads' rows are scaled by Dh^-0.5, so the queries come
        out pre-scaled for the softmax (a power of two for Dh = 64 or 256: the same numbers),
        and the value heads' rows are the identity (cos 1, sin 0: v passes through exactly).
        The attention path is chosen here, once, and the mask built in the form it takes."""
        B, N, S = mask.shape
        H, Hkv, Dh = self.n_heads, self.n_kv, self.head_dim
        scale = Dh ** -0.5

        def per_head(table: torch.Tensor, v_value: float) -> torch.Tensor:  # [P, Dh] -> [B, N, H + 2 Hkv, Dh]
            t = table[positions][:, :, None]  # [B, N, 1, Dh] float32
            v = t.new_full((1, 1, 1, 1), v_value).expand(B, N, Hkv, Dh)
            return torch.cat((t.mul(scale).expand(B, N, H, Dh), t.expand(B, N, Hkv, Dh), v), dim=2).to(dtype)

        cos, sin = per_head(cos_t, 1.0), per_head(sin_t, 0.0)
        matmul = use_matmul_attention(B, Hkv, self.rep * N, S, mask.device)
        rows = torch.arange(B, device=slots.device)[:, None]
        # decode steps only: the kernel walks every cache block for every query block (no causal
        # skipping), which a long prompt's prefill would pay for
        triton = N <= TRITON_MAX_TOKENS and use_triton_attention(B, Hkv, self.rep * N, S, Dh, dtype, mask.device)
        visible = mask if triton else None  # the kernel takes any strides
        # the folded mask serves the torch paths, the kernel's included when gradients flow (`forward`)
        folded = self.fold_mask(mask.logical_not() if matmul else mask) if not triton or torch.is_grad_enabled() else None
        return LayerInputs(cos, sin, rows, slots, folded, matmul, S, visible)

    def fuse(self) -> None:
        """Inference: one GEMM for q, k and v (see Transformer.fuse_projections)."""
        self.qkv_weight, self.qkv_bias, self.qkv_scale = _fuse_linears(self.q_proj, self.k_proj, self.v_proj)

    def project(self, x, cos, sin):
        """Pure part: q [B, N, H, Dh] (pre-scaled) and k, v [B, N, 2 Hkv, Dh], RoPE applied by
        the per-head tables of `inputs` (a unit that compilers may fuse)."""
        B, N, _ = x.shape
        H, Hkv, Dh = self.n_heads, self.n_kv, self.head_dim
        if self.qkv_weight is not None:
            qkv = _linear(x, self.qkv_weight, self.qkv_bias, self.qkv_scale)
        else:
            qkv = torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)
        qkv = qkv.view(B, N, H + 2 * Hkv, Dh)
        if self.q_norm is not None:  # per-head norms of q and k (the values pass as they are)
            qkv = torch.cat((self.q_norm(qkv[:, :, :H]), self.k_norm(qkv[:, :, H:H + Hkv]), qkv[:, :, H + Hkv:]), dim=2)
        qkv = apply_rope(qkv, cos, sin)
        return qkv[:, :, :H], qkv[:, :, H:]

    def forward(self, x, inp: LayerInputs, layer: int, cache: KVCache, ops: BlockOps = EAGER):
        B, N, _ = x.shape
        H, Hkv, Dh = self.n_heads, self.n_kv, self.head_dim
        q, kv = ops.project(self, x, inp.cos, inp.sin)
        cache.write(layer, inp.rows, inp.slots, kv)
        keys = cache.k[layer][:, :, :inp.kv_len]  # [B, Hkv, S, Dh]
        values = cache.v[layer][:, :, :inp.kv_len]
        if inp.visible is not None and not (torch.is_grad_enabled() and x.requires_grad):
            # one kernel: reads q in its [B, N, H, Dh] layout, writes o_proj's
            return self.o_proj(tree_attention(q, keys, values, inp.visible).view(B, N, H * Dh))
        # grouped-query attention: each kv head's query heads are folded into its query rows
        # (row r * N + n = head kv * rep + r, token n), so K and V are never copied per head
        q = q.transpose(1, 2).reshape(B, Hkv, self.rep * N, Dh)
        if inp.matmul:
            out = attend_matmul(q, keys, values, inp.mask)
        elif q.is_cuda and sdpa_kernel is not None:
            with sdpa_kernel(_SDPA_BACKENDS):
                # [B, Hkv, rep * N, Dh]; the queries came pre-scaled
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=inp.mask, scale=1.0)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=inp.mask, scale=1.0)
        out = out.reshape(B, H, N, Dh)
        return self.o_proj(out.transpose(1, 2).reshape(B, N, H * Dh))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.register_buffer("gate_up_weight", None, persistent=False)  # set by fuse(): gate and up in one GEMM
        self.register_buffer("gate_up_scale", None, persistent=False)  # FP8 projections: their per-channel scales

    def fuse(self) -> None:
        self.gate_up_weight, _, self.gate_up_scale = _fuse_linears(self.gate_proj, self.up_proj)

    def forward(self, x):
        if self.gate_up_weight is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        # fused (a GPU): the GEMM writes [2F, M], so gate and up are contiguous halves and the
        # elementwise kernels vectorise; slicing [M, 2F] gives strided halves instead (H200,
        # scripts/gpu/step_ops_bench.py: 13.7 -> 11.4 us per MLP at 64 tokens, equal at 1)
        if self.gate_up_scale is not None:  # FP8: [.., 2F] from its own GEMM, halves strided
            gate_up = fp8.linear(x, self.gate_up_weight, self.gate_up_scale, None)
            f = gate_up.shape[-1] // 2
            return self.down_proj(F.silu(gate_up[..., :f]) * gate_up[..., f:])
        M = x.shape[:-1]
        gate_up = torch.mm(self.gate_up_weight, x.reshape(-1, x.shape[-1]).t())  # [2F, M]
        f = gate_up.shape[0] // 2
        h = F.silu(gate_up[:f]).mul_(gate_up[f:])  # [F, M]
        return F.linear(h.t(), self.down_proj.weight).view(*M, -1)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, inp: LayerInputs, layer: int, cache: KVCache, ops: BlockOps = EAGER):
        x = x + self.self_attn(ops.norm(self.input_layernorm, x), inp, layer, cache, ops)
        return x + ops.mlp(self.mlp, ops.norm(self.post_attention_layernorm, x))

    def fuse(self) -> None:
        self.self_attn.fuse()
        self.mlp.fuse()


@dataclass(frozen=True)
class ForwardOut:
    hidden: torch.Tensor  # [B, N, D] final-norm hidden states (what the LM head and draft heads read)
    logits: torch.Tensor | None  # [B, N or len(logits_for), V] or None


class Transformer(nn.Module):
    """Parameter names follow HF (`model.layers.0.self_attn.q_proj.weight`, ...) minus the
    `model.` prefix, so checkpoints load by name."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        cos, sin = rope_table(cfg.max_position_embeddings, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)  # [P, Dh]
        self.register_buffer("rope_sin", sin, persistent=False)

    def tie_weights(self) -> None:
        """Share the LM head with the embedding when the config ties them (call again after
        anything that may re-create parameters, such as `to_empty`)."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def fuse_projections(self) -> "Transformer":
        """For inference: q/k/v and gate/up of every layer become one GEMM each (a decode step is
        launch-bound on a GPU: 3 fewer kernels per layer). The separate projections' weights stay
        as views of the fused ones, so anything reading them by name still works; call it after
        the weights are loaded and placed (a later `.to()` would copy views and fused weights
        apart). Not for training: the fused weights are buffers, outside autograd."""
        for layer in self.layers:
            layer.fuse()
        return self

    def fuse_projections_where_faster(self) -> "Transformer":
        """Fuse the projections (`fuse_projections`) on a GPU, whose decode step is launch-bound.
        A CPU keeps them separate: there the fused GEMMs measured 8-12% slower at 16-64 query
        tokens (2 cores). Call it once the model is on its device."""
        return self.fuse_projections() if self.device.type == "cuda" else self

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.allocate(self.cfg, batch, max_len, self.dtype, self.device)

    def forward(
        self,
        tokens: torch.Tensor,  # [B, N] token ids
        positions: torch.Tensor,  # [B, N] RoPE positions
        cache: KVCache,
        slots: torch.Tensor,  # [B, N] cache slots where the new K/V go
        mask: torch.Tensor,  # [B, N, S] bool: may query n see cache slot s (S = kv_len)
        logits_for: torch.Tensor | None | str = "all",  # "all" | None (no logits) | [B, M] indices into N
        ops: BlockOps = EAGER,  # how the pure per-layer pieces run (BlockOps)
    ) -> ForwardOut:
        x = self.embed_tokens(tokens)  # [B, N, D]
        inp = self.layers[0].self_attn.inputs(x.dtype, self.rope_cos, self.rope_sin, positions, slots, mask)
        for i, layer in enumerate(self.layers):
            x = layer(x, inp, i, cache, ops)
        h = ops.norm(self.norm, x)  # [B, N, D]
        if logits_for is None:
            return ForwardOut(h, None)
        if isinstance(logits_for, str):
            return ForwardOut(h, self.lm_head(h))
        picked = torch.gather(h, 1, logits_for[..., None].expand(-1, -1, h.shape[-1]))  # [B, M, D]
        return ForwardOut(h, self.lm_head(picked))
