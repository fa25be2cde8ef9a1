"""Convert a GGUF file once into a plain HF checkpoint directory (config.json + safetensors
shards) in the cache (`$MEDUSA_CACHE`, default `~/.cache/medusa`), so later loads read
safetensors lazily like any HF checkpoint.

Quantised tensors (Q4_1, Q8_0, ...) are dequantised to float16 (11 significant bits: a Q4/Q8
block value d * q + m rounds by at most 2^-11 of itself; bfloat16's 8 bits would move logits
visibly), F16 / BF16 tensors keep their dtype and F32 ones (norms) stay float32. That halves
the cache and the host memory of the old float32 conversion; the tensors are written in shards
of about 1 GB as they are converted, so the conversion never holds the whole model either.

Knows GGUF's tensor names and metadata keys; nothing of tokenizers, devices or heads."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from medusa.errors import ModelLoadError
from medusa.model.config import ModelConfig

CACHE_FORMAT = "f16"  # part of the cache folder's name: a change of format converts again
SHARD_BYTES = 1 << 30

_GGUF_NAMES = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", r"model.layers.\1.self_attn.q_proj.\2"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", r"model.layers.\1.self_attn.k_proj.\2"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", r"model.layers.\1.self_attn.v_proj.\2"),
    (r"blk\.(\d+)\.attn_output\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.attn_q_norm\.weight", r"model.layers.\1.self_attn.q_norm.weight"),
    (r"blk\.(\d+)\.attn_k_norm\.weight", r"model.layers.\1.self_attn.k_norm.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", r"model.layers.\1.mlp.down_proj.weight"),
]


def _hf_name(gguf_name: str) -> str | None:
    for pat, repl in _GGUF_NAMES:
        if re.fullmatch(pat, gguf_name):
            return re.sub(pat, repl, gguf_name)
    return None


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    a = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    names = {t.name for t in reader.tensors}
    n_heads = int(a("attention.head_count"))
    hidden = int(a("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    scaling = None
    if a("rope.scaling.type") not in (None, "none"):
        scaling = {"rope_type": a("rope.scaling.type"), "factor": float(a("rope.scaling.factor", 1.0))}
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        arch=arch,
        vocab_size=int(a("vocab_size") or len(tokens)),
        hidden_size=hidden,
        intermediate_size=int(a("feed_forward_length")),
        num_layers=int(a("block_count")),
        num_heads=n_heads,
        num_kv_heads=int(a("attention.head_count_kv", n_heads)),
        head_dim=int(a("attention.key_length") or hidden // n_heads),
        rms_norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(a("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(a("context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
    )


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of q/k rows for the llama arch (GGUF stores RoPE pairs
    interleaved; HF Llama rotates halves)."""
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _cache_dtype(tensor_type) -> torch.dtype:
    """What a GGUF tensor type is stored as in the cache: exact for float types, float16 for
    quantised blocks."""
    from gguf import GGMLQuantizationType as Q

    if tensor_type == Q.F32:
        return torch.float32
    if tensor_type == getattr(Q, "BF16", None):
        return torch.bfloat16
    return torch.float16


class _ShardWriter:
    """Writes tensors into model-0000N.safetensors files of about SHARD_BYTES as they come,
    then the index (the HF layout of a sharded checkpoint)."""

    def __init__(self, out: Path, source: str):
        self.out, self.source = out, source
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []

    def add(self, name: str, t: torch.Tensor) -> None:
        self.pending[name] = t
        self.pending_bytes += t.numel() * t.element_size()
        if self.pending_bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        fname = f"model-{len(self.shards) + 1:05d}.safetensors"
        tmp = self.out / f".{fname}.tmp{os.getpid()}"
        save_file(self.pending, str(tmp), metadata={"format": "pt", "source": self.source})
        os.replace(tmp, self.out / fname)
        self.shards.append((fname, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        index = {"metadata": {"source": self.source},
                 "weight_map": {k: f for f, keys in self.shards for k in keys}}
        tmp = self.out / f".index.tmp{os.getpid()}"
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, self.out / "model.safetensors.index.json")


def convert_gguf(path: Path, cache: Path, progress=None) -> Path:
    """Dequantise `path` into `cache/<stem>-<digest>-f16/` once; return that directory."""
    try:
        out = cache / f"{path.stem}-{_file_digest(path)}-{CACHE_FORMAT}"
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None
    if (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file():
        return out
    import gguf
    from gguf.quants import dequantize

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises assorted errors on corrupt files
        raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from None
    cfg = gguf_config(reader)
    out.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out, path.name)
    for i, t in enumerate(reader.tensors):
        if callable(progress):
            progress(i, len(reader.tensors), f"converting {path.name} (once)")
        name = _hf_name(t.name)
        if name is None:
            continue  # e.g. rope_freqs: recomputed from the config
        w = dequantize(t.data, t.tensor_type).reshape(tuple(int(s) for s in reversed(t.shape)))
        w = np.asarray(w, dtype=np.float32)
        if cfg.arch in ("llama", "mistral") and (".q_proj." in name or ".k_proj." in name):
            w = _unpermute(w, cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads)
        writer.add(name, torch.from_numpy(np.require(w, np.float32, ["C", "W"])).to(_cache_dtype(t.tensor_type)))
    writer.finish()
    (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=1))
    return out
