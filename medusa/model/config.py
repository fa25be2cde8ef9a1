"""Model hyper-parameters of the Llama family (llama, mistral, qwen2, qwen3), read from an HF
`config.json` or from GGUF metadata, and the checkpoint's weight quantisation as declared in its
`quantization_config`. Does not know about weights or devices."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from medusa.errors import ModelLoadError

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
_ARCH_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
# quantization_config.quant_method values whose linear weights are float8 e4m3 with a
# `weight_scale` next to each `weight` (per tensor or per output channel): fbgemm_fp8 and
# compressed-tensors as written by llm-compressor / vLLM's FP8 recipes, "fp8" (static scales)
FP8_METHODS = ("fbgemm_fp8", "compressed-tensors", "fp8")


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k before RoPE
    quantization: str | None = None  # None (plain weights) | "fp8" (linear weights float8 e4m3 + scales)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHS:
            raise ModelLoadError(
                f"unsupported architecture {self.arch!r}: supported are {', '.join(SUPPORTED_ARCHS)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError("num_heads must be a multiple of num_kv_heads")

    def to_hf(self) -> dict[str, Any]:
        """An HF-style config.json dict (so a converted checkpoint is a plain HF directory)."""
        eos = list(self.eos_token_ids)
        return {
            "architectures": [_ARCH_CLASSES[self.arch]],
            "model_type": self.arch,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_ARCHS:
            raise ModelLoadError(
                f"unsupported architecture {model_type!r} (config.json model_type): "
                f"supported are {', '.join(SUPPORTED_ARCHS)}"
            )
        act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
        if act != "silu":
            raise ModelLoadError(f"unsupported activation {act!r}")
        try:
            n_heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            scaling = cfg.get("rope_scaling") or None
            theta = cfg.get("rope_theta")
            if theta is None and isinstance(cfg.get("rope_parameters"), dict):  # transformers >= 5 layout
                theta = cfg["rope_parameters"].get("rope_theta")
                rp = {k: v for k, v in cfg["rope_parameters"].items() if k != "rope_theta"}
                if rp.get("rope_type", "default") != "default":
                    scaling = rp
            return cls(
                arch=model_type,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=n_heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
                head_dim=int(cfg.get("head_dim") or hidden // n_heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=float(theta if theta is not None else 10000.0),
                rope_scaling=scaling,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
                qk_norm=model_type == "qwen3",
                quantization=quantization_of(cfg.get("quantization_config")),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"config.json is missing or has a bad field: {e}") from None

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token holds in the cache at 2 bytes an element (bfloat16 or
        float16; scale by 2 for float32)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @property
    def num_params(self) -> int:
        d, f, v, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
        return L * per_layer + v * d * (1 if self.tie_word_embeddings else 2) + d


def quantization_of(qc: dict[str, Any] | None) -> str | None:
    """The weight format a config.json's `quantization_config` declares: None (no such block),
    "fp8" (float8 e4m3 weights with scales), or a ModelLoadError naming what is supported."""
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method in FP8_METHODS:
        if method == "compressed-tensors":
            groups = (qc.get("config_groups") or {}).values()
            for g in groups:
                w = (g or {}).get("weights") or {}
                if w.get("type") != "float" or int(w.get("num_bits", 0)) != 8:
                    raise ModelLoadError(
                        f"compressed-tensors weights of type {w.get('type')!r} / {w.get('num_bits')} bits are not "
                        "supported: only float8 (FP8) weights with per-tensor or per-channel scales")
                if w.get("strategy", "tensor") not in ("tensor", "channel"):
                    raise ModelLoadError(f"compressed-tensors FP8 strategy {w.get('strategy')!r} is not supported: "
                                         "per tensor or per channel")
        elif method == "fp8" and qc.get("weight_block_size"):
            raise ModelLoadError("block-wise FP8 weights (weight_block_size) are not supported: "
                                 "per tensor or per channel")
        return "fp8"
    raise ModelLoadError(f"unsupported quantization {method!r} (config.json quantization_config): "
                         f"supported are FP8 checkpoints ({', '.join(FP8_METHODS)}) and plain bf16/fp16/fp32 weights")
